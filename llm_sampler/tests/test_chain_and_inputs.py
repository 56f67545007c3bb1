"""The ordered `samplers=` chain, and clear ValueErrors for bad input before the first forward."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from llm_sampler import SamplingConfig, TokenSelector, generate, speculative_generate
from llm_sampler import processors as P
from llm_sampler.samplers import XTC, TopNSigma

V = 64


def toy_forward(calls: list[int]) -> Any:
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(0))

    def f(ids: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return table[ids]

    return f


def test_llama_cpp_order_is_one_keyword_and_differs_from_transformers() -> None:
    x = torch.randn(3, V, generator=torch.Generator().manual_seed(1)) * 2
    ids = torch.zeros(3, 1, dtype=torch.long)
    params = {"temperature": 0.5, "min_p": 0.2, "top_n_sigma": 1.5}
    chained = TokenSelector(SamplingConfig.from_kwargs({**params, "samplers": "llama.cpp"}), 1).process(
        ids, x
    )
    expected = P.Temperature(0.5)(
        ids, P.MinP(0.2)(ids, TopNSigma(1.5)(ids, x))
    )  # llama.cpp: temperature last
    assert torch.equal(chained.isfinite(), expected.isfinite())
    torch.testing.assert_close(chained[expected.isfinite()], expected[expected.isfinite()])
    default = TokenSelector(SamplingConfig.from_kwargs(params), 1).process(ids, x)
    hf_order = P.MinP(0.2)(ids, P.Temperature(0.5)(ids, TopNSigma(1.5)(ids, x)))
    assert torch.equal(default.isfinite(), hf_order.isfinite())


def test_chain_top_k_then_xtc_runs_on_survivors() -> None:
    x = torch.randn(2, V, generator=torch.Generator().manual_seed(2))
    ids = torch.zeros(2, 1, dtype=torch.long)
    cfg = SamplingConfig.from_kwargs(
        {"top_k": 5, "xtc_probability": 1.0, "xtc_threshold": 0.1, "samplers": ["top_k", "xtc"]}
    )
    out = TokenSelector(cfg, 1).process(ids, x)
    expected = XTC(1.0, 0.1)(ids, P.TopK(5)(ids, x))
    assert torch.equal(out.isfinite(), expected.isfinite())


def _llama_min_p(x: torch.Tensor, p: float) -> torch.Tensor:
    """llama.cpp's min-p, written out: keep the logits >= max + log(p)."""
    return x.masked_fill(x < x.amax(-1, keepdim=True) + torch.log(torch.tensor(p)), float("-inf"))


def _top_n_sigma_f64(x: torch.Tensor, n: float) -> torch.Tensor:
    """Top-nσ in float64, std over the finite logits of each row."""
    d = x.double()
    out = x.clone()
    for r in range(x.shape[0]):
        fin = d[r][d[r].isfinite()]
        out[r][d[r] < fin.max() - n * fin.std(correction=0)] = float("-inf")
    return out


@pytest.mark.parametrize("offset", [0.0, -30.0, 25.0])
def test_top_n_sigma_threshold_is_exact_far_from_zero(offset: float) -> None:
    """The CPU fast path (chunked two-pass variance) keeps exactly the float64 definition's tokens."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 40_000, generator=g) * 2.5 + offset
    x[5, :100] = float("-inf")  # a row with banned tokens takes the masked path
    ids = torch.zeros(6, 1, dtype=torch.long)
    for n in (0.5, 2.0, 3.5):
        assert torch.equal(TopNSigma(n)(ids, x).isfinite(), _top_n_sigma_f64(x, n).isfinite())


def test_chain_joins_thresholds_and_compacts_a_large_vocabulary() -> None:
    """top-nσ then min-p over 20k tokens: kept once, as survivors (ragged rows, one row keeping all
    but padding), then XTC and temperature on them; same distribution as the steps one after another."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 20_000, generator=g) * 3
    x[1] = 0.0  # a flat row: everything survives
    x[2, :7] = 50.0  # a row where few survive, among them token 0
    x[3, 0] = float("-inf")
    ids = torch.zeros(5, 1, dtype=torch.long)
    params = {"top_n_sigma": 2.0, "min_p": 0.05, "xtc_probability": 1.0, "xtc_threshold": 0.01}
    cfg = SamplingConfig.from_kwargs({**params, "temperature": 0.7, "samplers": "llama.cpp"})
    out = TokenSelector(cfg, 1).process(ids, x)
    expected = P.Temperature(0.7)(ids, XTC(1.0, 0.01)(ids, _llama_min_p(TopNSigma(2.0)(ids, x), 0.05)))
    assert torch.equal(out.isfinite(), expected.isfinite())
    torch.testing.assert_close(out.softmax(-1), expected.softmax(-1))


def test_token_step_after_compaction_keeps_token_zero() -> None:
    """DRY after min-p runs on the survivors scattered back: the -inf padding (token id 0) must not
    overwrite a real token 0."""
    x = torch.full((2, 10_000), -20.0)
    x[0, [0, 5, 9]] = torch.tensor([3.0, 2.5, 2.0])
    x[1, :40] = torch.linspace(1.0, 3.0, 40)
    ids = torch.tensor([[5, 9, 0, 5, 9], [1, 2, 3, 1, 2]])
    cfg = SamplingConfig.from_kwargs(
        {"min_p": 0.05, "dry_multiplier": 0.8, "dry_sequence_breakers": [], "samplers": ["min_p", "dry"]}
    )
    sel = TokenSelector(cfg, 0)
    out = sel.process(ids, x)
    dry = next(p for n, p in sel.chain.steps if n == "dry")
    expected = dry(ids, _llama_min_p(x, 0.05))
    assert torch.equal(out.isfinite(), expected.isfinite())
    torch.testing.assert_close(out[expected.isfinite()], expected[expected.isfinite()])
    assert out[0, 0] < 3.0  # token 0 extends the repeat "5 9 0": DRY lowered it, and it survived


def test_seeded_choice_is_the_same_with_and_without_compaction() -> None:
    """The Gumbel noise is keyed by token id: a chain that compacts picks what the full vocabulary would."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 30_000, generator=g) * 3
    ids = torch.zeros(8, 1, dtype=torch.long)
    cfg = SamplingConfig.from_kwargs({"min_p": 0.1, "top_n_sigma": 1.0, "samplers": "llama.cpp"})
    seeds = torch.arange(8)
    compacted = TokenSelector(cfg, 1, seeds)(ids, x, 3).tokens
    full = TokenSelector(cfg, 1, seeds).process(ids, x)
    from llm_sampler import rng

    keys = rng.row_keys(seeds, 3)
    assert torch.equal(compacted, (full + rng.gumbel(keys, None, full)).argmax(-1))


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"samplers": ["top_k", "nope"]}, "samplers"),
        ({"samplers": "llama"}, "samplers"),
        ({"dry_multiplier": -1.0}, "dry_multiplier"),
        ({"dry_base": 0.5}, "dry_base"),
        ({"dry_allowed_length": 0}, "dry_allowed_length"),
        ({"dry_penalty_last_n": -2}, "dry_penalty_last_n"),
        ({"dry_multiplier": 0.8}, "dry_sequence_breakers"),
        ({"dry_sequence_breakers": "\n"}, "dry_sequence_breakers"),
        ({"xtc_probability": 1.5}, "xtc_probability"),
        ({"xtc_threshold": -0.1}, "xtc_threshold"),
        ({"top_n_sigma": 0.0}, "top_n_sigma"),
        ({"mirostat": 3}, "mirostat"),
        ({"mirostat_tau": 0.0}, "mirostat_tau"),
        ({"mirostat_eta": -1.0}, "mirostat_eta"),
        ({"dynatemp_range": -0.5}, "dynatemp_range"),
        ({"dynatemp_exponent": 0.0}, "dynatemp_exponent"),
        ({"top_h": 1.5}, "top_h"),
        ({"mirostat": 2, "temperature": 0.0}, "mirostat"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": [1, -3]}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"temperature": "0.7"}, "temperature"),
        ({"top_k": 2.5}, "top_k"),
        ({"penalize_prompt": "no"}, "penalize_prompt"),
        ({"return_logprobs": 1}, "return_logprobs"),
        ({"decode": "tokenizer"}, "decode"),
        ({"stop_strings": ["ok", 3], "decode": str}, "stop_strings"),
    ],
)
def test_bad_values_raise_naming_the_parameter_before_any_forward(params: dict[str, Any], name: str) -> None:
    calls: list[int] = []
    with pytest.raises(ValueError, match=name):
        generate(toy_forward(calls), [1, 2, 3], 4, **params)
    assert calls == []


def test_empty_input_ids_raise_before_any_forward() -> None:
    calls: list[int] = []
    for empty in ([], [[]], torch.zeros(1, 0, dtype=torch.long), [[1, 2], []]):
        with pytest.raises(ValueError, match="input_ids"):
            generate(toy_forward(calls), empty, 2)
    assert calls == []


def test_prompt_ids_outside_the_vocabulary_raise() -> None:
    with pytest.raises(ValueError, match=r"input_ids holds token id 64, outside the vocabulary of 64"):
        generate(lambda ids: torch.zeros(ids.shape[0], ids.shape[1], V), [[1, 64]], 2)


def test_large_seeds_fit_and_reproduce() -> None:
    f = toy_forward([])
    a = generate(f, [1, 2], 5, seed=2**64 - 1).sequences
    b = generate(f, [1, 2], 5, seed=2**64 - 1).sequences
    assert torch.equal(a, b)
    generate(f, [1, 2], 2, seed=2**63)


def test_stop_strings_as_one_string_is_one_stop_string() -> None:
    config = SamplingConfig.from_kwargs({"stop_strings": "ab", "decode": str})
    assert list(config.stop_strings or []) == ["ab"]
    texts = {i: chr(ord("a") + i % 26) for i in range(V)}
    decode = lambda t: "".join(texts[i] for i in t)  # noqa: E731
    out = generate(toy_forward([]), [1], 30, stop_strings="zz", decode=decode, seed=0, temperature=3.0)
    text = decode(out.new_tokens[0].tolist())
    # a single character "z" would stop at its first occurrence; "zz" stops only after the pair
    assert "zz" in text or len(text) == 30
    assert "zz" not in text[:-1] or text.endswith("zz")


def test_speculative_refuses_mirostat_and_xtc() -> None:
    f = toy_forward([])
    for params, name in (({"mirostat": 2}, "mirostat"), ({"xtc_probability": 0.5}, "xtc_probability")):
        with pytest.raises(ValueError, match=name):
            speculative_generate(f, [1, 2, 3], 4, prompt_lookup_num_tokens=2, **params)


@pytest.mark.parametrize("name", ["json_schema", "regex", "choices", "grammar"])
def test_speculative_refuses_constraints(name: str) -> None:
    value = {
        "json_schema": {"type": "string"},
        "regex": "[a-z]+",
        "choices": ["yes"],
        "grammar": 'start: "a"',
    }
    with pytest.raises(ValueError, match=name):
        speculative_generate(toy_forward([]), [1, 2, 3], 4, prompt_lookup_num_tokens=2, **{name: value[name]})


def test_mirostat_and_dry_generate_end_to_end() -> None:
    f = toy_forward([])
    out = generate(
        f, [[1, 2, 3], [4, 5, 6]], 8, mirostat=2, seed=[1, 2], dry_multiplier=0.8, dry_sequence_breakers=[]
    )
    assert out.new_tokens.shape == (2, 8)
    again = generate(
        f, [[1, 2, 3], [4, 5, 6]], 8, mirostat=2, seed=[1, 2], dry_multiplier=0.8, dry_sequence_breakers=[]
    )
    assert torch.equal(out.sequences, again.sequences)
