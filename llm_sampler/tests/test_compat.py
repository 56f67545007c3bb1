"""The llm-sampler 0.4.0 functions keep their names and semantics."""

from __future__ import annotations

import torch

import llm_sampler


def test_create_batch_and_scores_of_continuations() -> None:
    ctx = torch.tensor([[5, 6, 7]])
    conts = [torch.tensor([1, 2]), torch.tensor([3]), torch.tensor([4, 4, 4])]
    batch = llm_sampler.create_batch_with_continuations(ctx, conts, padding_value=0)
    assert batch.tolist() == [[5, 6, 7, 1, 2, 0], [5, 6, 7, 3, 0, 0], [5, 6, 7, 4, 4, 4]]
    logits = torch.randn(3, 6, 10)
    scores = llm_sampler.get_scores_of_continuations(logits, conts, padding_value=0)
    # 0.4.0's loop: row i, positions -max_len-1 + j, token of the continuation or the padding value
    expected = torch.tensor(
        [
            [float(logits[i, -4 + j, (c[j] if j < len(c) else 0)]) for j in range(3)]
            for i, c in enumerate(conts)
        ]
    )
    assert torch.equal(scores, expected)


def test_best_continuation_naive() -> None:
    scores = torch.tensor([[1.0, 5.0], [1.05, 2.0], [0.0, 9.0]])
    assert int(llm_sampler.best_continuation_naive(scores, epsilon=0.1)) == 0
    assert int(llm_sampler.best_continuation_naive(scores, epsilon=0.01)) == 1
    assert int(llm_sampler.best_continuation_naive(torch.ones(2, 2), epsilon=0.0)) == 0


def test_samplers() -> None:
    logits = torch.tensor([[[0.0, 3.0, 1.0, 2.5]]])
    assert int(llm_sampler.sample_gpt_fast(logits, temperature=1.0, top_k=1)) == 1
    out = llm_sampler.sample_gpt_fast(logits)
    assert out.dtype == torch.int and out.shape == (1,)
    torch.manual_seed(0)
    batch = logits.expand(4000, 1, 4)
    tokens = llm_sampler.sample_huggingface(batch, temperature=0.5, top_k=2)
    assert set(tokens.tolist()) <= {1, 3}
    p3 = float(torch.softmax(torch.tensor([3.0, 2.5]) / 0.5, 0)[1])
    assert abs(float((tokens == 3).double().mean()) - p3) < 0.03
    assert set(llm_sampler.sample_huggingface(logits, temperature=0.0, top_k=1).tolist()) == {1}
