"""llama.cpp's samplers and transformers' top-H against independent references on constructed logits."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from llm_sampler import SamplingConfig, TokenSelector
from llm_sampler.samplers import DRY, XTC, DynamicTemperature, Mirostat, TopH, TopNSigma
from llm_sampler.samplers.dry import BreakerTable

NEG = float("-inf")


def logits(b: int = 4, v: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


def test_top_n_sigma_matches_definition() -> None:
    x = logits()
    x[0, :5] = NEG  # filtered tokens do not count in the std
    for n in (0.5, 1.0, 2.0):
        out = TopNSigma(n)(torch.zeros(4, 1, dtype=torch.long), x)
        for r in range(4):
            row = x[r].numpy().astype(np.float64)
            fin = row[np.isfinite(row)]
            keep = row >= fin.max() - n * fin.std()
            np.testing.assert_array_equal(out[r].isfinite().numpy(), keep)
            np.testing.assert_allclose(out[r].numpy()[keep], row[keep], rtol=0)


@pytest.mark.parametrize("top_h", [0.1, 0.4, 0.9, 1.0])
def test_top_h_equals_transformers(top_h: float) -> None:
    from transformers import TopHLogitsWarper

    x = logits(8, 300, seed=3)
    x[1, 10:200] = NEG
    ids = torch.zeros(8, 1, dtype=torch.long)
    ours, ref = TopH(top_h)(ids, x), TopHLogitsWarper(top_h)(ids, x.clone())
    assert torch.equal(ours.isfinite(), ref.isfinite())
    fin = ref.isfinite()
    assert float((ours[fin] - ref[fin]).abs().max()) <= 1e-6


def test_xtc_removes_all_above_threshold_but_the_least_likely() -> None:
    x = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.9, 0.05, 0.03, 0.02], [0.35, 0.35, 0.2, 0.1]]))
    out = XTC(1.0, 0.15)(torch.zeros(3, 1, dtype=torch.long), x)
    # rows 0 and 2: three pass -> the 0.2 stays (and the 0.1 below); row 1: one passes -> unchanged
    assert out[0].isfinite().tolist() == [False, False, True, True]
    assert torch.equal(out[1], x[1])
    assert out[2].isfinite().tolist() == [False, False, True, True]
    assert torch.equal(XTC(0.0, 0.2)(torch.zeros(3, 1, dtype=torch.long), x), x)


def test_xtc_probability_is_the_rate() -> None:
    x = torch.log(torch.tensor([[0.5, 0.4, 0.1]])).expand(20000, 3)
    out = XTC(0.3, 0.2)(torch.zeros(20000, 1, dtype=torch.long), x)
    rate = float((~out[:, 0].isfinite()).float().mean())
    assert abs(rate - 0.3) < 0.02  # 6 sigma of a binomial(20000, 0.3)


def dry_reference(
    ids: list[int], v: int, mult: float, base: float, allowed: int, breakers: set[int]
) -> np.ndarray:
    """Brute force: for each earlier position, the longest match of the context's tail (not crossing a
    breaker) ending just before it; the token at that position would extend the repeat."""
    t = len(ids)
    limit = 0
    while limit < t and ids[t - 1 - limit] not in breakers:
        limit += 1
    best = np.zeros(v, dtype=np.int64)
    for j in range(1, t):  # candidate ids[j] follows ids[:j]
        k = 0
        while k < j and k < limit and ids[j - 1 - k] == ids[t - 1 - k]:
            k += 1
        best[ids[j]] = max(best[ids[j]], k)
    pen = np.where(best >= allowed, mult * base ** (best - allowed).astype(np.float64), 0.0)
    return pen


@pytest.mark.parametrize("seed", range(6))
def test_dry_matches_brute_force(seed: int) -> None:
    g = np.random.default_rng(seed)
    v, t = 6, 40
    rows = [list(g.integers(0, v, t)) for _ in range(3)]
    rows.append([1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3] * 3 + [1, 2, 3, 4, 1, 2, 3])
    rows = [r[-t:] for r in rows]
    ids = torch.tensor(rows)
    scores = torch.zeros(len(rows), v)
    names = {0: "a", 1: "b", 2: "c", 3: "\n", 4: "d", 5: "e"}
    for breakers, table in (({3}, BreakerTable(["\n"], lambda t: names[t[0]])), (set(), None)):
        out = DRY(0.8, 1.75, 2, -1, table)(ids, scores)
        for r, row in enumerate(rows):
            ref = dry_reference(row, v, 0.8, 1.75, 2, breakers)
            np.testing.assert_allclose(-out[r].numpy(), ref, rtol=1e-5)


def test_dry_penalty_last_n_window() -> None:
    ids = torch.tensor([[1, 2, 3, 0, 0, 0, 1, 2]])
    assert float(DRY(1.0, 2.0, 2, -1)(ids, torch.zeros(1, 5))[0, 3]) == -1.0
    assert float(DRY(1.0, 2.0, 2, 4)(ids, torch.zeros(1, 5))[0, 3]) == 0.0


def test_dynamic_temperature_matches_llama_cpp_formula() -> None:
    x = logits(3, 20)
    x[2, 5:] = NEG
    out = DynamicTemperature(0.8, 0.5, 1.3)(torch.zeros(3, 1, dtype=torch.long), x)
    for r in range(3):
        row = x[r].double().numpy()
        fin = row[np.isfinite(row)]
        p = np.exp(fin - fin.max())
        p /= p.sum()
        h = -(p * np.log(p)).sum()
        t = 0.3 + (1.3 - 0.3) * (h / math.log(len(fin))) ** 1.3
        np.testing.assert_allclose(out[r].numpy()[np.isfinite(row)], fin / t, rtol=1e-5)


def test_mirostat_v2_truncates_by_surprise_and_updates_mu() -> None:
    x = logits(2, 30)
    m = Mirostat(2, tau=3.0, eta=0.2)
    out = m.truncate(x)
    for r in range(2):
        row = x[r].double().numpy()
        p = np.exp(row - row.max())
        p /= p.sum()
        keep = -np.log2(p) <= 6.0  # mu starts at 2 * tau
        keep[row.argmax()] = True
        assert out[r].isfinite().numpy().tolist() == keep.tolist()
    tokens = out.argmax(-1)
    m.update(out, tokens)
    for r in range(2):
        row = out[r].double().numpy()
        fin = np.isfinite(row)
        p = np.exp(row[fin] - row[fin].max())
        p /= p.sum()
        s = -math.log2(p.max())
        assert float(m.mu[r, 0]) == pytest.approx(6.0 - 0.2 * (s - 3.0), rel=1e-5)


def test_mirostat_v1_k_matches_llama_cpp_formula() -> None:
    x = logits(2, 500, seed=5)
    m = Mirostat(1, tau=5.0, eta=0.1)
    out = m.truncate(x)
    for r in range(2):
        row = np.sort(x[r].double().numpy())[::-1]
        p = np.exp(row - row.max())
        p /= p.sum()
        i = np.arange(99)
        t = np.log((i + 2) / (i + 1))
        b = np.log(p[:99] / p[1:100])
        s_hat = (t * b).sum() / (t * t).sum()
        e = s_hat - 1
        k = int(((e * 2**10.0) / (1 - 500 ** (-e))) ** (1 / s_hat))
        k = min(max(k, 1), 500)
        assert int(out[r].isfinite().sum()) == k


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    from scipy.stats import chisquare

    keep = probs > 0
    assert counts[~keep].sum() == 0, "a filtered token was sampled"
    return float(chisquare(counts[keep], probs[keep] * counts.sum()).pvalue)


def reference_filtered(name: str, x: np.ndarray) -> np.ndarray:
    """The filtered distribution (one row), computed here, for the chi-square tests."""
    p = np.exp(x - x.max())
    p /= p.sum()
    if name == "top_n_sigma":
        keep = x >= x.max() - 1.0 * x.std()
    elif name == "top_h":
        order = np.argsort(-x)[:100]
        q = p[order] / p[order].sum()
        terms = -q * np.log(q)
        sel = np.cumsum(terms) <= 0.5 * terms.sum()
        sel[0] = True
        keep = np.zeros_like(p, dtype=bool)
        keep[order[sel]] = True
    elif name == "dynatemp":
        h = -(p * np.log(p)).sum()
        t = 0.5 + (1.5 - 0.5) * (h / math.log(len(x)))
        q = np.exp((x - x.max()) / t)
        return q / q.sum()
    else:
        raise AssertionError(name)
    q = np.where(keep, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("top_n_sigma", {"top_n_sigma": 1.0}),
        ("top_h", {"top_h": 0.5}),
        ("dynatemp", {"dynatemp_range": 0.5}),
    ],
)
def test_sampled_frequencies_pass_chi_square(name: str, params: dict[str, Any]) -> None:
    v, n = 12, 30000
    x = logits(1, v, seed=11)[0] / 2
    config = SamplingConfig.from_kwargs({"seed": list(range(n)), **params})
    sel = TokenSelector(config, 1, torch.arange(n))
    tokens = sel(torch.zeros(n, 1, dtype=torch.long), x.expand(n, v), 0).tokens
    counts = np.bincount(tokens.numpy(), minlength=v)
    assert chi_square_p(counts, reference_filtered(name, x.double().numpy())) > 1e-3


def test_xtc_sampled_frequencies_pass_chi_square() -> None:
    x = torch.log(torch.tensor([0.45, 0.3, 0.15, 0.06, 0.04]))
    n = 30000
    config = SamplingConfig.from_kwargs({"xtc_probability": 0.5, "xtc_threshold": 0.1, "seed": 0})
    sel = TokenSelector(config, 1, torch.arange(n))
    counts = np.bincount(
        sel(torch.zeros(n, 1, dtype=torch.long), x.expand(n, 5), 0).tokens.numpy(), minlength=5
    )
    p = np.array([0.45, 0.3, 0.15, 0.06, 0.04])
    cut = np.array([0, 0, 0.15, 0.06, 0.04]) / 0.25  # the coin came up: only 0.15 (and below) survive
    assert chi_square_p(counts, 0.5 * p + 0.5 * cut) > 1e-3


def test_mirostat_sampled_frequencies_pass_chi_square() -> None:
    v, n = 40, 30000
    x = logits(1, v, seed=2)[0]
    config = SamplingConfig.from_kwargs({"mirostat": 2, "mirostat_tau": 1.5, "seed": 0})
    sel = TokenSelector(config, 1, torch.arange(n))
    counts = np.bincount(
        sel(torch.zeros(n, 1, dtype=torch.long), x.expand(n, v), 0).tokens.numpy(), minlength=v
    )
    row = x.double().numpy()
    p = np.exp(row - row.max())
    p /= p.sum()
    q = np.where(-np.log2(p) <= 3.0, p, 0.0)
    assert chi_square_p(counts, q / q.sum()) > 1e-3
