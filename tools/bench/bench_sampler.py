"""One sampling step: repetition penalty 1.1, temperature 0.8, top-k 50, top-p 0.9; batch 32, vocabulary
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
