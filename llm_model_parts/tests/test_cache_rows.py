"""Rows of one cache at different positions, added and removed between steps (what a server's continuous
batching does), against transformers running each sequence on its own."""

from __future__ import annotations

import pytest
import torch
from parts_testlib import fixtures
from transformers import AutoModelForCausalLM

from llm_model_parts import KVCache, load_part

TOL = 1e-4


def _hf_last_logits(hf, ids: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.inference_mode():
        return hf(torch.tensor([ids])).logits[0, -1]


@pytest.mark.parametrize("name", ["llama", "gemma3_text", "qwen2"])
def test_rows_join_decode_and_leave_at_their_own_positions(name: str) -> None:
    path = fixtures.tiny_checkpoint(name)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    part = load_part(path, "f")
    g = torch.Generator().manual_seed(0)
    cache: KVCache = part.new_cache(4, 64, rows=0)
    seqs: dict[int, list[int]] = {}  # row -> its tokens so far

    def admit(length: int) -> None:
        row = cache.add_row()
        prompt = torch.randint(3, 200, (1, length), generator=g)
        with torch.inference_mode():
            # prefill of the new row alone, in two chunks, while the others wait
            slots = cache.begin(length // 2, rows=slice(row, row + 1))
            part(prompt[:, : length // 2], cache, slots=slots)
            cache.commit(slots)
            slots = cache.begin(length - length // 2, rows=slice(row, row + 1))
            out = part(prompt[:, length // 2 :], cache, slots=slots)
            cache.commit(slots)
        seqs[row] = prompt[0].tolist()
        torch.testing.assert_close(out[0, -1], _hf_last_logits(hf, seqs[row]), atol=TOL, rtol=0)

    def step() -> None:
        rows = sorted(seqs)
        nxt = torch.randint(3, 200, (len(rows), 1), generator=g)
        with torch.inference_mode():
            out = part(nxt, cache)  # every row in use, each after its own cached tokens
        for r in rows:
            seqs[r].append(int(nxt[r, 0]))
            torch.testing.assert_close(out[r, -1], _hf_last_logits(hf, seqs[r]), atol=TOL, rtol=0)

    admit(7)
    step()
    admit(12)  # joins while row 0 is 8 tokens in
    step()
    step()
    admit(3)
    step()
    moved = cache.remove_row(0)  # row 0 finishes; the last row moves into its place
    assert moved == 2
    seqs = {0: seqs[2], 1: seqs[1]}
    step()
    assert cache.lengths[: cache.rows] == [len(seqs[0]), len(seqs[1])]


def test_rows_errors_name_what_is_wrong() -> None:
    part = load_part(fixtures.tiny_checkpoint("llama"), "f")
    cache = part.new_cache(1, 8, rows=0)
    with pytest.raises(ValueError, match="rows"):
        cache.begin(1)  # no row in use
    cache.add_row()
    with pytest.raises(RuntimeError, match="all 1 rows are in use"):
        cache.add_row()
    with pytest.raises(RuntimeError, match="overflow"):
        cache.begin(9)
    with pytest.raises(ValueError, match="remove_row"):
        cache.remove_row(3)


def test_reorder_follows_beams() -> None:
    path = fixtures.tiny_checkpoint("llama")
    part = load_part(path, "f")
    f = part.as_forward_func(max_seq_len=32)
    ids = torch.randint(3, 200, (3, 5))
    f(ids)
    f.reorder(torch.tensor([2, 2, 0]))
    nxt = torch.randint(3, 200, (3, 1))
    got = f(nxt)
    want = part(torch.cat([ids[[2, 2, 0]], nxt], dim=1))[:, -1:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_logits_to_keep_is_the_last_positions_of_the_full_logits() -> None:
    """HF's `logits_to_keep`: the head runs on the last n positions only; same numbers as keeping all."""
    path = fixtures.tiny_checkpoint("llama")
    part = load_part(path, "f")
    ids = torch.randint(3, 200, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = part(ids)
        for n in (1, 4):
            torch.testing.assert_close(part(ids, logits_to_keep=n), full[:, -n:], atol=1e-6, rtol=0)
    f = part.as_forward_func(max_seq_len=64)
    for _ in range(2):
        f.add_row()
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    prompt = torch.randint(3, 200, (2, 5), generator=torch.Generator().manual_seed(2))
    last = f(prompt, attention_mask=mask, rows=slice(0, 2), logits_to_keep=1)
    assert last.shape == (2, 1, full.shape[-1])
    f.reset()
    for _ in range(2):
        f.add_row()
    every = f(prompt, attention_mask=mask, rows=slice(0, 2))
    torch.testing.assert_close(last, every[:, -1:], atol=1e-6, rtol=0)


def test_cache_grown_by_a_long_row_is_freed_when_the_last_row_leaves() -> None:
    path = fixtures.tiny_checkpoint("llama")
    f = load_part(path, "f").as_forward_func(max_seq_len=1024)
    rows = [f.add_row(), f.add_row()]
    first = f.cache
    assert first is not None and first.max_seq_len == 256
    f(torch.randint(3, 200, (1, 300)), rows=slice(1, 2), logits_to_keep=1)  # grows to 512
    assert f.cache is not None and f.cache.max_seq_len == 512
    f.remove_row(rows[0])
    assert f.cache is not None  # a row is still in use: nothing moves
    f.remove_row(0)
    assert f.cache is None and f.rows == 0
    assert f.add_row() == 0 and f.cache is not None and f.cache.max_seq_len == 256
