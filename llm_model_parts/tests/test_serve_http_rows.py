"""IncrementalForward's rows protocol (docs/forward_func.md), the one the HTTP server's continuous batching
drives: rows join (prefilled in chunks, alone or as a left-padded group), decode together at their own
positions and leave, against transformers running each sequence on its own."""

from __future__ import annotations

import pytest
import torch
from parts_testlib import fixtures
from transformers import AutoModelForCausalLM

from llm_model_parts import load_part
from llm_model_parts.forward_func import IncrementalForward

TOL = 1e-4


def _hf_last(hf, ids: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.inference_mode():
        return hf(torch.tensor([ids])).logits[0, -1]


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_rows_protocol_matches_hf(name: str) -> None:
    path = fixtures.tiny_checkpoint(name)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    f = IncrementalForward([load_part(path, "f")], max_rows=4)
    g = torch.Generator().manual_seed(0)
    seqs: list[list[int]] = []  # index = row

    def admit(lengths: list[int], chunk: int) -> None:
        """A group of rows joins: left-padded to one length, prefilled `chunk` slots per call."""
        first = f.add_row()
        for _ in lengths[1:]:
            f.add_row()
        width = max(lengths)
        prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in lengths]
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        rows = slice(first, first + len(lengths))
        for s in range(0, width, chunk):
            e = min(width, s + chunk)
            out = f(ids[:, s:e], attention_mask=mask[:, :e], rows=rows)
        seqs.extend(prompts)
        for r, p in zip(range(first, first + len(lengths)), prompts, strict=True):
            torch.testing.assert_close(out[r - first, -1], _hf_last(hf, p), atol=TOL, rtol=0)

    def decode(upto: int | None = None) -> None:
        n = len(seqs) if upto is None else upto
        nxt = torch.randint(3, 200, (n, 1), generator=g)
        out = f(nxt, rows=slice(0, n))
        for r in range(n):
            seqs[r].append(int(nxt[r, 0]))
            torch.testing.assert_close(out[r, -1], _hf_last(hf, seqs[r]), atol=TOL, rtol=0)

    admit([9], chunk=4)
    decode()
    admit([5, 11], chunk=4)  # two join together while row 0 is 10 tokens in
    decode()
    decode(upto=2)  # a subset of rows (row 2 waits)
    f.rewind(1, row=0)  # a row can drop its own last token
    seqs[0].pop()
    moved = f.remove_row(0)  # row 0 leaves: the last row moves into its index
    assert moved == 2
    seqs = [seqs[2], seqs[1]]
    decode()
    admit([100], chunk=64)
    decode()
    assert f.rows == 3


def test_rows_protocol_errors() -> None:
    f = IncrementalForward([load_part(fixtures.tiny_checkpoint("llama"), "f")], max_rows=1)
    with pytest.raises(ValueError, match="add_row"):
        f(torch.tensor([[1]]), rows=slice(0, 1))
    f.add_row()
    with pytest.raises(RuntimeError, match="all 1 rows"):
        f.add_row()
    with pytest.raises(ValueError, match="rows"):
        f(torch.tensor([[1], [2]]), rows=slice(0, 1))
    with pytest.raises(ValueError, match="max_rows"):
        IncrementalForward([load_part(fixtures.tiny_checkpoint("llama"), "f")], max_rows=0)


def test_copy_prefix_then_ragged_rest_matches_hf() -> None:
    """A prefix prefilled once in row 0 and copied into rows 1 and 2; their different rests follow,
    left-padded after the prefix (the mask covers both): every row's logits are transformers' alone."""
    path = fixtures.tiny_checkpoint("llama")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    f = IncrementalForward([load_part(path, "f")], max_rows=4)
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, 200, (12,), generator=g).tolist()
    rests = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (5, 2, 4)]
    for _ in rests:
        f.add_row()
    f(torch.tensor([prefix[:7]]), rows=slice(0, 1))
    f(torch.tensor([prefix[7:]]), rows=slice(0, 1))
    f.copy_prefix(0, 1, len(prefix))
    f.copy_prefix(0, 2, len(prefix))
    width = max(len(r) for r in rests)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rests])
    mask = torch.tensor([[1] * len(prefix) + [0] * (width - len(r)) + [1] * len(r) for r in rests])
    out = f(ids, attention_mask=mask, rows=slice(0, 3), logits_to_keep=1)
    for r, rest in enumerate(rests):
        torch.testing.assert_close(out[r, -1], _hf_last(hf, prefix + rest), atol=TOL, rtol=0)
    nxt = torch.tensor([[5], [6], [7]])
    out = f(nxt, rows=slice(0, 3))
    for r, rest in enumerate(rests):
        torch.testing.assert_close(out[r, -1], _hf_last(hf, prefix + rest + [5 + r]), atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="copy_prefix"):
        f.copy_prefix(0, 1, 3)  # row 1 is not empty
    f.add_row()
    with pytest.raises(ValueError, match="copy_prefix"):
        f.copy_prefix(0, 3, 100)  # longer than row 0
