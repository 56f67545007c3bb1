"""Integration with llm_model_parts: a Part's incremental forward_func (with forward_packed) in the sampler."""

from __future__ import annotations

from typing import Any

import fixtures
import pytest
import torch
from test_scoring import TEXT_REQUESTS, naive_loglikelihood, random_questions

import llm_model_parts
from llm_sampler import generate, score, score_many


@pytest.fixture(scope="module")
def tiny_part_forward() -> Any:
    return llm_model_parts.load_part(fixtures.tiny_checkpoint("llama"), "f").as_forward_func(max_seq_len=128)


def test_part_scores_match_naive(tiny_llama: Any, tiny_part_forward: Any) -> None:
    assert hasattr(tiny_part_forward, "forward_packed")
    for ctx, opts in random_questions(1, 3):
        for s, opt in zip(score(tiny_part_forward, ctx, opts), opts, strict=True):  # one question: packed
            ref, greedy = naive_loglikelihood(tiny_llama, ctx, opt)
            assert abs(s.loglikelihood - ref) < 1e-4 and s.is_greedy == greedy


def test_part_greedy_equals_transformers(tiny_llama: Any, tiny_part_forward: Any) -> None:
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    batched = generate(tiny_part_forward, prompts, 8, temperature=0, pad_token_id=0)
    for row, seq in zip(prompts, batched.sequences, strict=True):
        with torch.no_grad():
            ref = tiny_llama.generate(torch.tensor([row]), max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert seq[-8:].tolist() == ref[0, len(row) :].tolist()


def test_part_score_many_real_smollm2(smollm2: Any, smollm2_path: Any, smollm2_tokenizer: Any) -> None:
    from test_scoring import lm_eval_encode_pair

    f = llm_model_parts.load_part(smollm2_path, "f").as_forward_func(max_seq_len=256)
    results = score_many(f, smollm2_tokenizer, TEXT_REQUESTS)  # several questions: batched slots with rewind
    for (context, options), scores in zip(TEXT_REQUESTS, results, strict=True):
        for option, s in zip(options, scores, strict=True):
            ref, greedy = naive_loglikelihood(
                smollm2, *lm_eval_encode_pair(smollm2_tokenizer, context, option)
            )
            assert abs(s.loglikelihood - ref) < 1e-4 and s.is_greedy == greedy


def test_engine_shares_a_common_prefix_and_answers_as_alone(tiny_part_forward: Any) -> None:
    """Jobs joining together that start with one 40-token prefix (a system prompt; a job with n=2): the
    engine prefills it once and copies it; every choice equals `generate` alone (greedy and seeded)."""
    import threading

    from llm_sampler import SamplingConfig
    from llm_sampler.batch import SamplingRow
    from llm_sampler.server.engine import Engine, Event, Job

    f = llm_model_parts.load_part(fixtures.tiny_checkpoint("llama"), "f").as_forward_func(max_seq_len=128)
    copies: list[tuple[int, int, int]] = []
    copy = f.copy_prefix
    f.copy_prefix = lambda src, dst, n: (copies.append((src, dst, n)), copy(src, dst, n))[1]  # type: ignore[method-assign]
    system = [(7 * i) % 200 + 3 for i in range(40)]
    jobs = [
        ([*system, 50, 51, 52], [{"temperature": 0}]),
        ([*system, 60], [{"temperature": 0.9, "seed": 4}, {"temperature": 0.9, "seed": 5}]),
        ([*system, 70, 71, 72, 73, 74], [{"temperature": 0, "repetition_penalty": 1.3}]),
    ]
    engine = Engine(f, max_rows=4, prefill_chunk=16, admit_wait=1.0)
    out: list[list[list[int]]] = [[[] for _ in params] for _, params in jobs]
    done = threading.Semaphore(0)
    for k, (prompt, params) in enumerate(jobs):

        def emit(ev: Event, k: int = k) -> None:
            if ev.kind == "token" and ev.token is not None:
                out[k][ev.choice].append(ev.token.token)
            elif ev.kind in ("done", "error"):
                assert ev.kind == "done", ev.message
                done.release()

        rows = [SamplingRow(SamplingConfig.from_kwargs(p), prompt, 6) for p in params]
        engine.submit(Job(f"j{k}", prompt, rows, emit))
    engine.start()  # all four rows are queued: one group
    try:
        for _ in range(4):
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    assert copies == [(0, 1, 40), (0, 2, 40), (0, 3, 40)]
    for (prompt, params), got in zip(jobs, out, strict=True):
        for p, tokens in zip(params, got, strict=True):
            assert tokens == generate(tiny_part_forward, prompt, 6, **p).new_tokens[0].tolist(), p
