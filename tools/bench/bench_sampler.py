"""Also: DRY + top-nσ + min-p + XTC + temperature (llama.cpp's chain) against the same chain as transformers
LogitsProcessors, and the cost of a constraint's token mask on a SmolLM2 decode step.

One sampling step: repetition penalty 1.1, temperature 0.8, top-k 50, top-p 0.9; batch 32, vocabulary
151,936 (Qwen-sized), fp32, CPU. transformers' LogitsProcessorList + softmax + multinomial against
llm_sampler's TokenSelector, side by side in one process. Before timing, the bench asserts that both give
the same distribution (the probabilities after all processors, compared token by token).

    .venv/bin/python tools/bench/bench_sampler.py [--quick] [--batch 32] [--vocab 151936] [--repeat 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from llm_sampler import SamplingConfig, TokenSelector

HERE = Path(__file__).resolve().parent
SETTINGS = dict(repetition_penalty=1.1, temperature=0.8, top_k=50, top_p=0.9)


def reference(
    prompt_len: int,
) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], Callable[..., torch.Tensor]]:
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(SETTINGS["repetition_penalty"]),
            TemperatureLogitsWarper(SETTINGS["temperature"]),
            TopKLogitsWarper(SETTINGS["top_k"]),
            TopPLogitsWarper(SETTINGS["top_p"]),
        ]
    )

    def step(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        probs = processors(ids, logits).softmax(-1)
        return torch.multinomial(probs, 1)[:, 0]

    def distribution(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return processors(ids, logits).softmax(-1)

    return step, distribution


def timeit(fn: Callable[[], object], repeat: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


LLAMA_SETTINGS = dict(
    dry_multiplier=0.8, dry_sequence_breakers=[], xtc_probability=1.0, xtc_threshold=0.001,
    top_n_sigma=2.0, min_p=0.05, temperature=0.8,
)  # fmt: skip


class RefDRY:
    """DRY as a transformers LogitsProcessor, the way text-generation-webui writes it (a loop per row)."""

    def __init__(self, multiplier: float, base: float = 1.75, allowed: int = 2) -> None:
        self.m, self.b, self.a = multiplier, base, allowed

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        for r, row in enumerate(input_ids.tolist()):
            t, best = len(row), {}
            for j in range(1, t):
                k = 0
                while k < j and row[j - 1 - k] == row[t - 1 - k]:
                    k += 1
                if k >= self.a:
                    best[row[j]] = max(best.get(row[j], 0), k)
            for tok, k in best.items():
                scores[r, tok] -= self.m * self.b ** (k - self.a)
        return scores


class RefTopNSigma:
    """Top-nσ as a LogitsProcessor, vectorised over the batch (std over each row's finite logits)."""

    def __init__(self, n: float) -> None:
        self.n = n

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        finite = scores.isfinite()
        count = finite.sum(-1, keepdim=True)
        x = scores.masked_fill(~finite, 0.0)
        mean = x.sum(-1, keepdim=True) / count
        std = ((x - mean).square() * finite).sum(-1, keepdim=True).div(count).sqrt()
        top = scores.amax(-1, keepdim=True)
        return scores.masked_fill(scores < top - self.n * std, float("-inf"))


class RefXTC:
    """XTC as a LogitsProcessor, vectorised over the batch (the coin always lands: probability 1)."""

    def __init__(self, threshold: float) -> None:
        self.t = threshold

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = scores.softmax(-1)
        above = probs >= self.t
        least = probs.masked_fill(~above, 2.0).argmin(-1, keepdim=True)
        remove = above.scatter(1, least, False) & (above.sum(-1, keepdim=True) >= 2)
        return scores.masked_fill(remove, float("-inf"))


def llama_chain(args: argparse.Namespace, repeat: int) -> dict[str, float]:
    """DRY + top-nσ + min-p + XTC + temperature (llama.cpp's order) against the same chain as LogitsProcessors."""
    import transformers as T

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(args.batch, args.vocab, generator=g) * 3
    ids = torch.randint(0, 50, (args.batch, args.prompt_len), generator=g)  # repeats for DRY to find
    ref = T.LogitsProcessorList(
        [
            RefDRY(0.8),
            RefTopNSigma(2.0),
            T.MinPLogitsWarper(0.05),
            RefXTC(0.001),
            T.TemperatureLogitsWarper(0.8),
        ]
    )
    config = SamplingConfig.from_kwargs({**LLAMA_SETTINGS, "samplers": "llama.cpp"})
    selector = TokenSelector(config, prompt_len=args.prompt_len)
    ours_p, ref_p = selector.process(ids, logits).softmax(-1), ref(ids, logits).softmax(-1)
    diff = float((ours_p - ref_p).abs().max())
    assert diff < 1e-5, f"llama.cpp chain: distributions differ by {diff}"

    def ref_step() -> torch.Tensor:
        return torch.multinomial(ref(ids, logits).softmax(-1), 1)

    with torch.inference_mode():
        t_ref = statistics.median(timeit(ref_step, max(1, repeat // 4))) * 1e3
        t_ours = statistics.median(timeit(lambda: selector(ids, logits, 0).tokens, repeat)) * 1e3
    print(f"\nllama.cpp chain, batch {args.batch}, vocab {args.vocab:,}: {LLAMA_SETTINGS}")
    print(f"same distribution: max |dp| = {diff:.2e}")
    print(f"{'transformers-style LogitsProcessors':<42} {t_ref:10.2f} {1.0:8.2f}")
    print(f"{'llm_sampler samplers=llama.cpp':<42} {t_ours:10.2f} {t_ref / t_ours:8.2f}")
    return {"chain_max_abs_prob_diff": diff, "chain_reference_ms": t_ref, "chain_ours_ms": t_ours,
            "chain_speedup": t_ref / t_ours}  # fmt: skip


def constraint_cost(tokens: int) -> dict[str, float]:
    """ms per SmolLM2-135M decode step on the CPU, with and without a constraint (mask in a thread).

    A step's cost is (time of N tokens - time of 1 token) / (N - 1): the prompt's prefill and the
    constraint's one-time set-up (grammar compile, matchers) are reported apart, not spread over the
    tokens; the constraints are chosen so that none completes before N tokens.
    """
    import sys

    sys.path.insert(0, str(HERE.parent))
    import fixtures
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_sampler import IncrementalHF, generate, structured

    path = fixtures.real_checkpoint("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = [tok("Write a long list of words:").input_ids]
    schema = {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 64}
    runs = {"none": {}, "regex": {"regex": "[a-z ]{400}"}, "json_schema": {"json_schema": schema}}
    structured.lltokenizer(tok)  # built once per tokenizer (~1 s), cached
    out: dict[str, float] = {}

    def run(n: int, params: dict) -> tuple[float, int]:
        t0 = time.perf_counter()
        g = generate(IncrementalHF(model), ids, n, tokenizer=tok, temperature=0, **params)
        return time.perf_counter() - t0, g.new_tokens.shape[1]

    steps: dict[str, list[float]] = {name: [] for name in runs}
    firsts: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for _ in range(5):  # interleaved, so that a burst of load elsewhere hits every variant alike
            for name, params in runs.items():
                t1, _ = run(1, params)
                tn, n = run(tokens, params)
                if n != tokens:
                    raise RuntimeError(f"{name}: stopped after {n} of {tokens} tokens")
                steps[name].append((tn - t1) / (n - 1) * 1e3)
                firsts[name].append(t1 * 1e3)
        for name, params in runs.items():
            out[f"decode_ms_per_token_{name}"] = statistics.median(steps[name])
            out[f"first_token_ms_{name}"] = statistics.median(firsts[name])
            if params:
                kind, grammar = structured.grammar_text(**params) or ("", "")
                t0 = time.perf_counter()
                structured.Constraint(kind, grammar, tok, 1).close()
                out[f"setup_ms_{name}"] = (time.perf_counter() - t0) * 1e3
    print(
        f"\nSmolLM2-135M decode on the CPU, {tokens} tokens, ms per step (median of 5 interleaved runs; prefill and set-up apart)"
    )
    print(f"{'constraint':<16} {'ms/step':>10} {'vs none':>8} {'first token ms':>15} {'set-up ms':>10}")
    for name in runs:
        ms = out[f"decode_ms_per_token_{name}"]
        setup = out.get(f"setup_ms_{name}", 0.0)
        print(
            f"{name:<16} {ms:10.2f} {ms / out['decode_ms_per_token_none'] - 1:+8.1%} "
            f"{out[f'first_token_ms_{name}']:15.1f} {setup:10.1f}"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--decode-tokens", type=int, default=32, help="SmolLM2 tokens per constraint run; 0 skips"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeat = 3 if args.quick else args.repeat
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(args.batch, args.vocab, generator=g) * 3
    ids = torch.randint(0, args.vocab, (args.batch, args.prompt_len), generator=g)

    ref_step, ref_distribution = reference(args.prompt_len)
    config = SamplingConfig.from_kwargs(SETTINGS)
    selector = TokenSelector(config, prompt_len=args.prompt_len)

    # same distribution: every token's probability after all the processors
    ours_probs = selector.process(ids, logits).softmax(-1)
    theirs = ref_distribution(ids, logits)
    max_diff = float((ours_probs - theirs).abs().max())
    same_support = bool(((ours_probs > 0) == (theirs > 0)).all())
    assert same_support and max_diff < 1e-5, (
        f"distributions differ: max |dp| = {max_diff}, same support {same_support}"
    )

    with torch.inference_mode():
        t_ref = timeit(lambda: ref_step(ids, logits), repeat)
        t_ours = timeit(lambda: selector(ids, logits, 0).tokens, repeat)
        seeded = TokenSelector(config, args.prompt_len, torch.arange(args.batch))
        t_seeded = timeit(lambda: seeded(ids, logits, 0).tokens, repeat)
    ref_ms, ours_ms, seeded_ms = (statistics.median(t) * 1e3 for t in (t_ref, t_ours, t_seeded))
    report = {
        "settings": SETTINGS,
        "batch": args.batch,
        "vocab": args.vocab,
        "prompt_len": args.prompt_len,
        "threads": args.threads,
        "max_abs_prob_diff": max_diff,
        "transformers_ms": ref_ms,
        "ours_ms": ours_ms,
        "ours_seeded_ms": seeded_ms,
        "speedup": ref_ms / ours_ms,
        "speedup_seeded": ref_ms / seeded_ms,
    }
    print(f"one step, batch {args.batch}, vocab {args.vocab:,}: {SETTINGS}")
    print(f"same distribution: max |p_ours - p_transformers| = {max_diff:.2e}")
    print(f"{'method':<42} {'median ms':>10} {'speedup':>8}")
    print(f"{'transformers LogitsProcessorList+multinomial':<42} {ref_ms:10.2f} {1.0:8.2f}")
    print(f"{'llm_sampler TokenSelector':<42} {ours_ms:10.2f} {ref_ms / ours_ms:8.2f}")
    print(f"{'llm_sampler TokenSelector, per-row seeds':<42} {seeded_ms:10.2f} {ref_ms / seeded_ms:8.2f}")
    report.update(llama_chain(args, repeat))
    if args.decode_tokens:
        report.update(constraint_cost(args.decode_tokens))
    out = HERE / "results" / "sampler.json"
    out.parent.mkdir(exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as f:
        json.dump(report, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, out)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
