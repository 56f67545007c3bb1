"""Per-row sampling (llm_sampler.batch): rows with their own parameters, joining at different steps, draw
the tokens `generate` draws for each of them alone."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from llm_sampler import SamplingConfig, generate
from llm_sampler.batch import RowError, SamplingRow, sample_rows

V = 64
_g = torch.Generator().manual_seed(0)
W1, W2 = torch.randn(V, V, generator=_g) * 3, torch.randn(V, V, generator=_g)


def toy(ids: torch.Tensor) -> torch.Tensor:
    """A stateless forward_func: the logits depend on the last two tokens."""
    prev = torch.cat([ids[:, :1], ids[:, :-1]], 1)
    return W1[ids] + W2[prev]


PARAMS: list[dict[str, Any]] = [
    {"temperature": 0},
    {"temperature": 0.8, "top_k": 20, "seed": 1},
    {"temperature": 1.1, "top_p": 0.9, "seed": 2},
    {"temperature": 1.1, "top_p": 0.9, "seed": 5},  # same config as the row above: one group
    {"temperature": 1.1, "top_p": 0.9, "seed": 7},
    {"temperature": 0.9, "repetition_penalty": 1.3, "presence_penalty": 0.5, "seed": 3},
    {"temperature": 1.0, "mirostat": 2, "mirostat_tau": 3.0, "seed": 4},
    {"temperature": 1.0, "min_p": 0.05, "xtc_probability": 0.5, "xtc_threshold": 0.05, "seed": 9},
    {"temperature": 0.7, "samplers": "llama.cpp", "top_k": 30, "repetition_penalty": 1.2, "seed": 11},
    {"temperature": 1.0, "top_n_sigma": 1.5, "eos_token_id": 5, "seed": 12},
    {"temperature": 1.0, "dynatemp_range": 0.5, "seed": 13},
    {"temperature": 1.0},  # unseeded: only checked to run
]


def test_rows_match_generate_alone() -> None:
    n_new = 12
    prompts = [[(7 * i + j) % V for j in range(3 + i % 4)] for i in range(len(PARAMS))]
    expected = []
    for p, params in zip(prompts, PARAMS, strict=True):
        out = generate(toy, p, n_new, **params).new_tokens[0].tolist()
        eos = params.get("eos_token_id")
        if eos is not None and eos in out:
            out = out[: out.index(eos) + 1]
        expected.append(out)
    live: list[tuple[int, SamplingRow]] = []
    got: dict[int, list[int]] = {i: [] for i in range(len(PARAMS))}
    pending = list(range(len(PARAMS)))
    step = 0
    while pending or live:
        if pending and step % 2 == 0:  # rows join every other step, two at a time
            for i in pending[:2]:
                live.append((i, SamplingRow(SamplingConfig.from_kwargs(PARAMS[i]), prompts[i], n_new)))
            pending = pending[2:]
        logits = torch.cat([toy(r.ids)[:, -1] for _, r in live])
        for (i, _), tok in zip(live, sample_rows([r for _, r in live], logits), strict=True):
            got[i].append(tok.token)
            if tok.finished:
                assert tok.finish_reason == ("stop" if len(expected[i]) < n_new else "length")
        live = [(i, r) for i, r in live if not r.finished]
        step += 1
    for i in range(len(PARAMS) - 1):
        assert got[i] == expected[i], (i, PARAMS[i])
    assert len(got[len(PARAMS) - 1]) == n_new


def test_groups_share_one_selector_call_and_logprobs() -> None:
    cfg = SamplingConfig.from_kwargs({"temperature": 1.0, "top_k": 5})
    rows = [SamplingRow(cfg, [1, 2], 3, top_logprobs=2) for _ in range(3)]
    assert len({r.group for r in rows}) == 1
    logits = torch.randn(3, V)
    steps = sample_rows(rows, logits)
    lp = logits.log_softmax(-1)
    for i, s in enumerate(steps):
        assert s.logprob == pytest.approx(float(lp[i, s.token]))
        assert s.top is not None and s.top[0][0] == int(lp[i].argmax())
    penalised = SamplingRow(SamplingConfig.from_kwargs({"repetition_penalty": 1.2}), [1], 3)
    assert penalised.group is None


def test_bad_logits_name_the_row() -> None:
    rows = [SamplingRow(SamplingConfig(), [1], 3), SamplingRow(SamplingConfig(temperature=0), [1], 3)]
    logits = torch.randn(2, V)
    logits[1, 3] = float("nan")
    with pytest.raises(RowError) as e:
        sample_rows(rows, logits)
    assert e.value.row == 1
