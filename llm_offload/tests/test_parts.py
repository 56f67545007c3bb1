"""With llm_model_parts: a Part's layers streamed, its KV cache resident; outputs equal the resident Part."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_hf_parity import assert_same

from llm_offload import SepweightSource, offload

llm_model_parts = pytest.importorskip("llm_model_parts")

IDS = torch.tensor([[5, 17, 99, 3, 42, 7], [9, 8, 7, 6, 5, 4]])


def decode(forward_func: Any, ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
    with torch.no_grad():
        logits = [forward_func(ids)]
        for _ in range(steps):
            logits.append(forward_func(logits[-1][:, -1:].argmax(-1)))
    return logits


def resident(path: Path, spec: str) -> Any:
    # Streamed layers run on the weights as the source gives them, the resident reference as loaded.
    return llm_model_parts.load_part(path, spec)


def test_full_part_streams_with_incremental_cache(tiny_llama_sepweight: Path) -> None:
    want = decode(resident(tiny_llama_sepweight, "f").as_forward_func(max_seq_len=32), IDS, 4)
    part = resident(tiny_llama_sepweight, "f")
    off = offload(part.layers, SepweightSource(tiny_llama_sepweight, layers=part.layer_indices), "cpu")
    forward_func = part.as_forward_func(max_seq_len=32)
    got = decode(forward_func, IDS, 4)
    assert_same(got, want)
    assert forward_func.seq_len == IDS.shape[1] + 4  # the forward_func owns the cache
    assert all(s.calls == 5 for s in off.stats.layers)
    off.remove()


def test_middle_part(tiny_llama_sepweight: Path) -> None:
    ref = resident(tiny_llama_sepweight, "1-3")
    part = resident(tiny_llama_sepweight, "1-3")
    # No begin, no end: every weight of this part streams (Part.device skips the released `meta` tensors).
    off = offload(part.layers, SepweightSource(tiny_llama_sepweight, layers=part.layer_indices), "cpu",
                  prefetch_depth=1)  # fmt: skip
    h = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(part(h), ref(h))
    off.remove()


def test_parts_equal_hf(tiny_llama: Any, reference_llama: Any, tiny_llama_sepweight: Path) -> None:
    part = llm_model_parts.load_part(tiny_llama_sepweight, "f")
    off = offload(part.layers, SepweightSource(tiny_llama_sepweight), "cpu")
    with torch.no_grad():
        got, want = part(IDS), reference_llama(IDS).logits
    assert (got - want).abs().max() <= 1e-4
    off.remove()
