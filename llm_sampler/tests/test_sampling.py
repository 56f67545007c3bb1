"""Sampling against transformers: same processed distributions, same greedy tokens, statistics of samples."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sampler_testlib import stateless

import llm_sampler
from llm_sampler import IncrementalHF, SamplingConfig, TokenSelector, generate, sample, sample_steps

V = 1000


def hf_processors(cfg: dict[str, Any], prompt_len: int) -> Any:
    import transformers as T

    out = T.LogitsProcessorList()
    if "logit_bias" in cfg:
        out.append(T.SequenceBiasLogitsProcessor({(k,): v for k, v in cfg["logit_bias"].items()}))
    if "repetition_penalty" in cfg:
        ignore = prompt_len if cfg.get("penalize_prompt") is False else None
        out.append(T.RepetitionPenaltyLogitsProcessor(cfg["repetition_penalty"], prompt_ignore_length=ignore))
    if "no_repeat_ngram_size" in cfg:
        out.append(T.NoRepeatNGramLogitsProcessor(cfg["no_repeat_ngram_size"]))
    if "bad_words_ids" in cfg:
        out.append(T.NoBadWordsLogitsProcessor(cfg["bad_words_ids"], eos_token_id=None))
    if "min_new_tokens" in cfg:
        out.append(
            T.MinNewTokensLengthLogitsProcessor(prompt_len, cfg["min_new_tokens"], cfg["eos_token_id"])
        )
    if cfg.get("temperature", 1.0) != 1.0:
        out.append(T.TemperatureLogitsWarper(cfg["temperature"]))
    if "top_k" in cfg:
        out.append(T.TopKLogitsWarper(cfg["top_k"]))
    if "top_p" in cfg:
        out.append(T.TopPLogitsWarper(cfg["top_p"]))
    if "min_p" in cfg:
        out.append(T.MinPLogitsWarper(cfg["min_p"]))
    if "typical_p" in cfg:
        out.append(T.TypicalLogitsWarper(cfg["typical_p"]))
    if "epsilon_cutoff" in cfg:
        out.append(T.EpsilonLogitsWarper(cfg["epsilon_cutoff"]))
    if "eta_cutoff" in cfg:
        out.append(T.EtaLogitsWarper(cfg["eta_cutoff"], device="cpu"))
    return out


CONFIGS = [
    dict(temperature=0.7),
    dict(top_k=50),
    dict(top_p=0.8),
    dict(repetition_penalty=1.3, temperature=0.8, top_k=50, top_p=0.9),
    dict(repetition_penalty=1.5, penalize_prompt=False, top_p=0.5),
    dict(temperature=1.3, min_p=0.05),
    dict(top_k=200, min_p=0.1, temperature=0.5),
    dict(typical_p=0.7),
    dict(top_k=100, typical_p=0.5),
    dict(epsilon_cutoff=3e-4),
    dict(eta_cutoff=2e-3, temperature=0.9),
    dict(no_repeat_ngram_size=2, top_k=20),
    dict(no_repeat_ngram_size=1),
    dict(bad_words_ids=[[5], [7, 8], [9, 10, 11]], top_p=0.95),
    dict(min_new_tokens=3, eos_token_id=[3, 4], temperature=0.6),
    dict(logit_bias={1: 5.0, 2: -100.0, 3: float("-inf")}, top_k=10),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(c))
def test_processed_distribution_matches_transformers(cfg: dict[str, Any]) -> None:
    g = torch.Generator().manual_seed(0)
    prompt_len = 6
    ids = torch.randint(0, 40, (4, prompt_len + 2), generator=g)  # small ids: repeats, n-grams, bad words hit
    ids[1, -3:] = torch.tensor([9, 10, 11])[:3]
    ids[2, -1] = 7
    logits = torch.randn(4, V, generator=g) * 3
    logits[:, :40] += 2  # make the seen tokens likely, so penalties and bans matter
    ours = TokenSelector(SamplingConfig.from_kwargs(cfg), prompt_len).process(ids, logits).softmax(-1)
    theirs = hf_processors(cfg, prompt_len)(ids, logits.clone()).softmax(-1)
    assert torch.equal(ours > 0, theirs > 0)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    expected = probs * n
    keep = expected > 0
    assert counts[~keep].sum() == 0, "sampled a token of probability 0"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


@pytest.mark.parametrize("seeded", [True, False])
@pytest.mark.parametrize(
    "cfg", [dict(temperature=0.9, top_k=8, top_p=0.9), dict(min_p=0.05, temperature=1.5), dict(typical_p=0.9)]
)
def test_samples_follow_distribution(cfg: dict[str, Any], seeded: bool) -> None:
    """Many rows of the same logits in one step: the token frequencies match the processed distribution."""
    torch.manual_seed(1234)  # the unseeded path uses torch's generator
    n, vocab = 20000, 12
    logits = (torch.randn(vocab, generator=torch.Generator().manual_seed(3)) * 1.5).expand(n, vocab)
    ids = torch.zeros(n, 1, dtype=torch.long)
    seeds = torch.arange(n) if seeded else None
    selector = TokenSelector(SamplingConfig.from_kwargs(cfg), 1, seeds)
    tokens = selector(ids, logits, step=0).tokens
    probs = selector.process(ids[:1], logits[:1])[0].softmax(-1)
    counts = torch.bincount(tokens, minlength=vocab).double()
    dof = int((probs > 0).sum()) - 1
    assert (
        chi_square(counts, probs.double()) < dof + 6 * (2 * dof) ** 0.5
    )  # ~6 sigma: deterministic, not flaky


def test_greedy_equals_transformers(tiny_llama: Any) -> None:
    ids = torch.randint(3, 256, (3, 7), generator=torch.Generator().manual_seed(0))
    kw = dict(
        max_new_tokens=15, do_sample=False, pad_token_id=0, repetition_penalty=1.2, no_repeat_ngram_size=3
    )
    with torch.no_grad():
        ref = tiny_llama.generate(ids, eos_token_id=None, **kw)
    for f in (stateless(tiny_llama), IncrementalHF(tiny_llama)):
        out = generate(f, ids, 15, temperature=0, repetition_penalty=1.2, no_repeat_ngram_size=3)
        assert torch.equal(out.sequences, ref)


def test_greedy_left_padded_batch_equals_transformers(tiny_llama: Any) -> None:
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    for row in prompts:  # each prompt alone, as transformers generates it
        with torch.no_grad():
            ref = tiny_llama.generate(torch.tensor([row]), max_new_tokens=8, do_sample=False, pad_token_id=0)
        out = generate(IncrementalHF(tiny_llama), [row], 8, temperature=0)
        assert torch.equal(out.sequences, ref)
    batched = generate(IncrementalHF(tiny_llama), prompts, 8, temperature=0, pad_token_id=0)
    for row, seq in zip(prompts, batched.sequences, strict=True):
        alone = generate(IncrementalHF(tiny_llama), [row], 8, temperature=0).new_tokens[0]
        assert torch.equal(seq[-8:], alone)


def test_seed_gives_same_tokens_whatever_the_batch(tiny_llama: Any) -> None:
    f = IncrementalHF(tiny_llama)
    prompts = [[5, 6, 7], [8, 9, 10], [11, 12, 13]]
    kw = dict(temperature=0.9, top_k=40, top_p=0.95)
    batch = generate(f, prompts, 10, seed=[1, 2, 3], **kw).new_tokens
    for i, p in enumerate(prompts):
        alone = generate(f, [p], 10, seed=i + 1, **kw).new_tokens[0]
        assert torch.equal(batch[i], alone)
    again = generate(stateless(tiny_llama), prompts, 10, seed=[1, 2, 3], **kw).new_tokens
    assert torch.equal(batch, again)
    other = generate(f, prompts, 10, seed=[4, 5, 6], **kw).new_tokens
    assert not torch.equal(batch, other)
    n3 = generate(f, [prompts[0]], 10, seed=1, num_return_sequences=3, **kw).new_tokens
    assert n3.shape == (3, 10) and torch.equal(n3[0], batch[0]) and not torch.equal(n3[1], n3[2])


def fixed(logits_row: torch.Tensor) -> Any:
    return lambda x: logits_row.expand(x.shape[0], x.shape[1], -1).clone()


def test_stopping_and_outputs(tiny_llama: Any) -> None:
    f = IncrementalHF(tiny_llama)
    free = generate(f, [[5, 6, 7]], 12, temperature=0).new_tokens[0].tolist()
    out = generate(f, [[5, 6, 7]], 12, temperature=0, eos_token_id=[free[4], 255], pad_token_id=0)
    assert out.new_tokens[0].tolist()[: free.index(free[4]) + 1] == free[: free.index(free[4]) + 1]
    assert out.new_tokens.shape[1] == free.index(free[4]) + 1
    stop = free[2:4]
    end = next(i for i in range(1, 12) if free[i - 1 : i + 1] == stop) + 1
    out = generate(f, [[5, 6, 7]], 12, temperature=0, stop_sequences=[stop])
    assert out.new_tokens[0].tolist() == free[:end]
    out = generate(
        f, [[5, 6, 7]], 12, temperature=0, stop_strings=["x"], decode=lambda ids: "x" if len(ids) >= 3 else ""
    )
    assert out.new_tokens.shape[1] == 3
    out = generate(f, [[5, 6, 7]], 12, temperature=0, min_new_tokens=6, eos_token_id=free[0])
    assert free[0] not in out.new_tokens[0, :5].tolist()
    assert generate(f, [[5]], 1000, temperature=0, max_time=1e-9).new_tokens.shape[1] <= 1
    # rows that finish get the pad token; log-probabilities come from the final distribution
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    out = generate(
        fixed(logits),
        [[0], [1]],
        5,
        top_k=3,
        temperature=0.5,
        seed=0,
        return_logprobs=True,
        eos_token_id=3,
        pad_token_id=0,
    )
    final = (logits / 0.5).masked_fill(logits < logits.topk(3).values[-1], float("-inf")).log_softmax(-1)
    for row, lp in zip(out.new_tokens, out.logprobs, strict=True):  # type: ignore[arg-type]
        live = torch.cumsum((row == 3).long(), 0) - (row == 3).long() == 0
        torch.testing.assert_close(lp[live], final[row[live]])
        assert (lp[~live] == 0).all() and (row[~live] == 0).all()
    steps = list(sample_steps(fixed(logits), [[0]], 4, temperature=0, return_logprobs=True))
    assert len(steps) == 4 and all(s.tokens.tolist() == [3] for s in steps)
    assert [int(t) for t in sample(fixed(logits), [0, 1], 3, temperature=0)] == [3, 3, 3]


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("temperature", -1.0), ("temperature", float("nan")), ("top_k", 0), ("top_k", 2.5), ("top_p", 0.0),
        ("top_p", 1.5), ("min_p", 1.0), ("typical_p", 0.0), ("epsilon_cutoff", -0.1), ("eta_cutoff", 1.0),
        ("repetition_penalty", 0.0), ("presence_penalty", float("inf")), ("frequency_penalty", float("nan")),
        ("no_repeat_ngram_size", -1), ("bad_words_ids", [[]]), ("logit_bias", {-1: 1.0}), ("min_new_tokens", -2),
        ("eos_token_id", -1), ("stop_sequences", [[1, -2]]), ("stop_strings", [""]), ("max_time", 0),
        ("seed", "x"), ("num_return_sequences", 0), ("logits_processors", [1]), ("pad_token_id", -3),
    ],
)  # fmt: skip
def test_bad_parameters_name_themselves(param: str, value: Any) -> None:
    with pytest.raises(ValueError, match=param):
        generate(fixed(torch.zeros(8)), [[1]], 2, **{param: value})


def test_degenerate_inputs() -> None:
    f = fixed(torch.zeros(8))
    with pytest.raises(ValueError, match="NaN"):
        generate(fixed(torch.full((8,), float("nan"))), [[1]], 2)
    with pytest.raises(ValueError, match="filtered out"):
        generate(f, [[1]], 2, bad_words_ids=[[t] for t in range(8)])
    with pytest.raises(ValueError, match="at least one"):
        generate(f, [[]], 2)
    with pytest.raises(ValueError, match="at least one"):
        generate(f, torch.zeros(1, 0, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="batch of"):
        generate(lambda x: torch.zeros(x.shape[0] + 1, 8), [[1]], 2)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(f, [[1]], 2, eos_token_id=9)
    with pytest.raises(ValueError, match="attention_mask"):
        generate(f, torch.ones(2, 3, dtype=torch.long), 2, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="seed"):
        generate(f, [[1], [2]], 2, seed=[1, 2, 3])
    with pytest.raises(TypeError, match="unknown sampling parameter"):
        generate(f, [[1]], 2, top_n=3)
    with pytest.raises(ValueError, match="decode"):
        generate(f, [[1]], 2, stop_strings=["a"])
    assert generate(f, [[1]], 0).sequences.tolist() == [[1]]


def test_user_processor_runs_before_warpers() -> None:
    seen = []

    def ban_odd(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        seen.append(scores.shape)
        return scores.index_fill(1, torch.arange(1, scores.shape[1], 2), float("-inf"))

    out = generate(fixed(torch.zeros(10)), [[1]] * 4, 20, top_k=3, logits_processors=[ban_odd], seed=0)
    assert (out.new_tokens % 2 == 0).all() and seen[0] == (4, 10)
    assert isinstance(llm_sampler.processors.TopP(0.5)(torch.zeros(1, 1), torch.zeros(1, 4)), torch.Tensor)


def test_presence_frequency_penalties() -> None:
    ids = torch.tensor([[1, 2, 2, 3, 3, 3]])
    scores = torch.zeros(1, 5)
    out = llm_sampler.processors.PresenceFrequencyPenalty(0.5, 0.25, prompt_len=1)(ids, scores)
    assert out.tolist() == [[0.0, 0.0, -1.0, -1.25, 0.0]]
