"""Beam search against transformers' `generate(num_beams=...)` on a tiny random model."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sampler_testlib import stateless

from llm_sampler import IncrementalHF, beam_search


def trimmed(seqs: torch.Tensor, prompt_len: int, eos: list[int]) -> list[list[int]]:
    """Each sequence up to and including its first eos (transformers and we pad differently after it)."""
    out = []
    for row in seqs.tolist():
        new = row[prompt_len:]
        end = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
        out.append(row[:prompt_len] + new[:end])
    return out


@pytest.mark.parametrize(
    ("length_penalty", "early_stopping", "with_eos"),
    [(1.0, False, False), (1.0, False, True), (2.0, True, True), (-0.5, "never", True), (0.0, "never", True)],
)
def test_beam_search_matches_transformers(
    tiny_llama: Any, length_penalty: float, early_stopping: Any, with_eos: bool
) -> None:
    ids = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        greedy = tiny_llama.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    eos = [int(greedy[0, 8]), int(greedy[1, 9])] if with_eos else None  # tokens the beams will meet
    kw = dict(
        num_beams=4, num_return_sequences=3, length_penalty=length_penalty, early_stopping=early_stopping
    )
    with torch.no_grad():
        ref = tiny_llama.generate(
            ids, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0,
            return_dict_in_generate=True, output_scores=True, repetition_penalty=1.1, **kw,
        )  # fmt: skip
    for f in (stateless(tiny_llama), IncrementalHF(tiny_llama)):
        out = beam_search(f, ids, 8, eos_token_id=eos, pad_token_id=0, repetition_penalty=1.1, **kw)
        assert out.sequences.shape == ref.sequences.shape
        assert trimmed(out.sequences, 6, eos or []) == trimmed(ref.sequences, 6, eos or [])
        torch.testing.assert_close(out.scores, ref.sequences_scores, atol=1e-5, rtol=1e-5)


def test_beam_search_validates() -> None:
    f = lambda x: torch.zeros(*x.shape, 8)  # noqa: E731
    for kw, name in [
        (dict(num_beams=0), "num_beams"),
        (dict(early_stopping="sometimes"), "early_stopping"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (dict(length_penalty=float("nan")), "length_penalty"),
    ]:
        with pytest.raises(ValueError, match=name):
            beam_search(f, [[1]], 3, **kw)
    with pytest.raises(TypeError, match="top_p"):
        beam_search(f, [[1]], 3, top_p=0.5)
