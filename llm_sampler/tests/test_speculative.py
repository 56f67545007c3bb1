"""Speculative decoding: greedy output identical to the target's; sampled output distributed as the target's."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sampler_testlib import stateless

from llm_sampler import (
    IncrementalHF,
    SamplingConfig,
    TokenSelector,
    generate,
    prompt_lookup,
    speculative_generate,
)
from llm_sampler.speculative import speculative_sample


def test_greedy_identical_to_target(tiny_llama: Any, tiny_draft: Any) -> None:
    ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    ref = generate(stateless(tiny_llama), ids, 20, temperature=0, repetition_penalty=1.2).sequences
    drafts = [
        dict(draft_forward_func=stateless(tiny_draft)),
        dict(draft_forward_func=IncrementalHF(tiny_draft), num_draft_tokens=3),
        dict(draft_forward_func=IncrementalHF(tiny_llama)),  # a perfect draft: everything accepted
        dict(prompt_lookup_num_tokens=3),
    ]
    for target in (stateless(tiny_llama), IncrementalHF(tiny_llama)):
        for kw in drafts:
            out = speculative_generate(target, ids, 20, temperature=0, repetition_penalty=1.2, **kw)
            assert torch.equal(out.sequences, ref)


def test_prompt_lookup() -> None:
    assert prompt_lookup([1, 2, 3, 4, 1, 2], 2) == [3, 4]
    assert prompt_lookup([1, 2, 3, 9, 2, 3, 7, 2, 3], 3) == [7, 2, 3]
    assert prompt_lookup([1, 2, 3], 2) == []


class Markov:
    """A stateless toy model: the logits depend on the last token only (vocabulary of 6)."""

    def __init__(self, seed: int, sharp: float) -> None:
        self.table = torch.randn(6, 6, generator=torch.Generator().manual_seed(seed)) * sharp

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x]


def exact_marginals(target: Markov, cfg: dict[str, Any], first: int, steps: int) -> list[torch.Tensor]:
    """The distribution of each generated token when sampling from the target alone (processed rows)."""
    selector = TokenSelector(SamplingConfig.from_kwargs(cfg), 1)
    rows = torch.stack(
        [selector.process(torch.tensor([[t]]), target.table[t][None])[0].softmax(-1) for t in range(6)]
    )
    p = torch.nn.functional.one_hot(torch.tensor(first), 6).double()
    out = []
    for _ in range(steps):
        p = p @ rows.double()
        out.append(p)
    return out


@pytest.mark.parametrize("mode", ["draft", "lookup"])
def test_sampling_distribution_equals_target(mode: str) -> None:
    target, draft = Markov(0, 1.5), Markov(1, 1.5)
    cfg = dict(temperature=0.8, top_k=5)
    runs, steps = 1500, 3
    kw = (
        dict(draft_forward_func=draft, num_draft_tokens=3)
        if mode == "draft"
        else dict(prompt_lookup_num_tokens=2)
    )
    prompt = [0, 1, 2, 0, 1]  # prompt lookup finds matches in it
    counts = torch.zeros(steps, 6, dtype=torch.float64)
    for seed in range(runs):
        tokens = [int(t) for t in speculative_sample(target, prompt, steps, seed=seed, **cfg, **kw)]
        for i, t in enumerate(tokens):
            counts[i, t] += 1
    for i, p in enumerate(exact_marginals(target, cfg, prompt[-1], steps)):
        expected = p * runs
        keep = expected > 0
        assert counts[i][~keep].sum() == 0
        chi2 = float(((counts[i][keep] - expected[keep]) ** 2 / expected[keep]).sum())
        dof = int(keep.sum()) - 1
        assert chi2 < dof + 6 * (2 * dof) ** 0.5, (i, chi2, counts[i], expected)


def test_speculative_validates(tiny_llama: Any) -> None:
    f = stateless(tiny_llama)
    with pytest.raises(ValueError, match="exactly one"):
        speculative_generate(f, [[1]], 3)
    with pytest.raises(ValueError, match="one sequence"):
        speculative_generate(f, [[1], [2]], 3, prompt_lookup_num_tokens=2)
    with pytest.raises(ValueError, match="num_draft_tokens"):
        speculative_generate(f, [[1]], 3, draft_forward_func=f, num_draft_tokens=0)
    with pytest.raises(ValueError, match="every position"):
        speculative_generate(lambda x: torch.zeros(x.shape[0], 8), [[1]], 3, prompt_lookup_num_tokens=2)
