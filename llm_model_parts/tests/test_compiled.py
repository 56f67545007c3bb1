"""The compiled decode step (torch.compile, fullgraph=True, static cache) gives the eager logits, for rows
at different positions, on one graph for every step."""

from __future__ import annotations

import pytest
import torch
from parts_testlib import fixtures

from llm_model_parts import load_part
from llm_model_parts.compiled import CompiledDecoder


@pytest.mark.parametrize("name", ["gemma3_text"])  # sliding and global layers, QK-norm, tied head
def test_compiled_decode_equals_eager(name: str) -> None:
    torch._dynamo.reset()
    part = load_part(fixtures.tiny_checkpoint(name), "f")
    eager_cache, cache = part.new_cache(2, 32, rows=0), part.new_cache(2, 32, rows=0)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for length in (5, 9):  # two rows, each prefilled alone: they sit at different positions
            prompt = torch.randint(3, 200, (1, length), generator=g)
            for c in (eager_cache, cache):
                row = c.add_row()
                slots = c.begin(length, rows=slice(row, row + 1))
                part(prompt, c, slots=slots)
                c.commit(slots)
    decoder = CompiledDecoder(part, cache)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(4):
            ids = torch.randint(3, 200, (2, 1), generator=g)
            with torch.inference_mode():
                want = part(ids, eager_cache)
            got = decoder(ids)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert cache.lengths == eager_cache.lengths


def test_compiled_decoder_checks_its_input() -> None:
    part = load_part(fixtures.tiny_checkpoint("llama"), "f")
    decoder = CompiledDecoder(part, part.new_cache(2, 8))
    with pytest.raises(ValueError, match=r"expected ids \(2, 1\)"):
        decoder(torch.ones(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="begin and end"):
        CompiledDecoder(load_part(fixtures.tiny_checkpoint("llama"), "0-2"), part.new_cache(1, 8))
