"""Test helpers shared by llm_sampler's tests (a unique module name: all packages' tests run in one pytest)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def load_hf(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def stateless(model: Any) -> Any:
    def f(x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            return model(x, attention_mask=attention_mask).logits

    return f


class NaivePacked:
    """Test-only incremental forward_func with `forward_packed`, by brute force: it remembers the token ids
    and runs the whole sequence through a stateless model every call (one sequence per packed token)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.calls = {"call": 0, "packed": 0}
        self.reset()

    def reset(self) -> None:
        self.ids: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None

    @property
    def seq_len(self) -> int:
        return 0 if self.ids is None else self.ids.shape[1]

    def rewind(self, n: int) -> None:
        assert self.ids is not None and 0 <= n <= self.seq_len
        self.ids = self.ids[:, : self.seq_len - n]
        self.mask = None if self.mask is None else self.mask[:, : self.ids.shape[1]]

    def __call__(self, new_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.calls["call"] += 1
        self.ids = new_ids if self.ids is None else torch.cat([self.ids, new_ids], 1)
        if attention_mask is None:
            attention_mask = (
                torch.ones_like(self.ids)
                if self.mask is None
                else torch.cat([self.mask, torch.ones_like(new_ids)], 1)
            )
        assert attention_mask.shape == self.ids.shape
        self.mask = attention_mask
        positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
        with torch.no_grad():
            out = self.model(self.ids, attention_mask=attention_mask, position_ids=positions).logits
        return out[:, -new_ids.shape[1] :].float()

    def forward_packed(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, tree_mask: torch.Tensor
    ) -> torch.Tensor:
        if self.ids is None:  # an empty cache: the packed tokens see only each other
            self.ids = torch.zeros(1, 0, dtype=torch.long)
        assert self.ids.shape[0] == 1
        self.calls["packed"] += 1
        out = []
        for j in range(input_ids.shape[1]):
            seen = tree_mask[0, j].nonzero()[:, 0]
            assert bool(tree_mask[0, j, j]) and int(position_ids[0, j]) == self.seq_len + len(seen) - 1
            if len(seen) == 0:
                raise AssertionError("a packed token must see itself")
            assert self.mask is None or bool(self.mask.all()), "packed continuation of a padded prefix"
            seq = torch.cat([self.ids[0], input_ids[0, seen]])[None]
            with torch.no_grad():
                out.append(self.model(seq).logits[:, -1].float())
        if self.seq_len == 0:
            self.ids = None
        return torch.stack(out, 1)
