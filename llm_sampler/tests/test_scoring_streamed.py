"""score_many over a model whose layers stream from disk (llm_offload), and the shared-prefix packing: the
scores equal a full-sequence reference (transformers, one forward per context + option) to 1e-4 (fp32)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import fixtures
import pytest
import torch

from llm_sampler import score_many

llm_model_parts = pytest.importorskip("llm_model_parts")
pytest.importorskip("llm_offload")
pytestmark = pytest.mark.timeout(300)

SHARED = "The following are questions about the world.\n\n"
QUESTIONS = [
    (SHARED + "Question: What is the capital of France?\nAnswer:", [" Paris", " London", " Rome"]),
    (SHARED + "Question: What colour is the sky?\nAnswer:", [" blue", " green"]),
    (SHARED + "Question: How many legs has a cat?\nAnswer:", [" four", " two", " six legs"]),
    ("Another context altogether:", [" yes", " no"]),
    (SHARED + "Question: What is the capital of France? Think.\nAnswer:", [" Paris", " Lyon"]),
]


def reference(hf: Any, tok: Any) -> list[list[float]]:
    """One full forward per (context, option), lm-evaluation-harness's split of the tokens."""
    from llm_sampler.closed_form import TextEncoder

    enc = TextEncoder(tok)
    out = []
    for ctx, options in QUESTIONS:
        row = []
        for o in options:
            c, cont = enc.pair(ctx, o)
            ids = torch.tensor([list(c) + list(cont)])
            with torch.inference_mode():
                lp = hf(ids).logits[0, :-1].float().log_softmax(-1)
            row.append(sum(float(lp[len(c) - 1 + k, t]) for k, t in enumerate(cont)))
        out.append(row)
    return out


def close(got: list[Any], want: list[list[float]]) -> float:
    return max(
        abs(a - b) for s, w in zip(got, want, strict=True) for a, b in zip(s.loglikelihoods, w, strict=True)
    )


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_streamed_score_many_equals_reference(name: str, caplog: pytest.LogCaptureFixture) -> None:
    import bigmodel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(fixtures.real_checkpoint(name))
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    want = reference(hf, tok)
    resident = llm_model_parts.load_part(path, "f").as_forward_func(max_seq_len=512)
    assert close(score_many(resident, tok, QUESTIONS), want) <= 1e-4
    assert close(score_many(resident, tok, QUESTIONS, pack_tokens=40), want) <= 1e-4  # several packs
    part, off = bigmodel.stream_part(path, dtype=torch.float32, prefetch_depth=2, direct=True)
    off.source.reset_bytes_read()
    with caplog.at_level(logging.INFO, logger="llm_sampler.scoring"):
        got = score_many(part.as_forward_func(max_seq_len=512), tok, QUESTIONS, progress=True)
    assert close(got, want) <= 1e-4
    assert [s.best() for s in got] == [max(range(len(w)), key=w.__getitem__) for w in want]
    layer_bytes = sum(off.source.plan(i).read_bytes for i in range(len(off.source)))
    # one pack: one read of each layer for every question (and the next pass's first layers read ahead)
    ranges = sum(len(off.source.plan(i).ranges) for i in range(len(off.source)))
    slack = 2 * 4096 * ranges  # O_DIRECT reads whole 4 KiB blocks
    assert off.source.bytes_read <= layer_bytes + 2 * off.source.plan(0).read_bytes + slack
    off.remove()


def test_shared_prefix_is_computed_once() -> None:
    """The pack holds the shared prefix once: fewer tokens than the contexts and options add up to."""
    seen: list[int] = []
    path = fixtures.tiny_checkpoint("llama")
    f = llm_model_parts.load_part(path, "f").as_forward_func(max_seq_len=256)
    real = f.forward_packed

    def spy(ids: torch.Tensor, pos: torch.Tensor, tree: torch.Tensor) -> torch.Tensor:
        seen.append(ids.shape[1])
        return real(ids, pos, tree)

    f.forward_packed = spy  # type: ignore[method-assign]
    from llm_sampler.scoring import score_requests

    shared = tuple(range(10, 40))
    reqs = [((*shared, 50 + q), (60 + k,)) for q in range(6) for k in range(3)]
    got = score_requests(f, reqs)
    assert seen == [30 + 6]  # the 30 shared tokens once, then one per question (one-token options)
    f.forward_packed = real  # type: ignore[method-assign]
    want = score_requests(f, reqs, use_cache=False)  # one stateless row per context + option
    for a, b in zip(got, want, strict=True):
        assert abs(a.logprobs[0] - b.logprobs[0]) <= 1e-4
