"""Closed-form scoring on SmolLM2-135M-Instruct (CPU, fp32), side by side in one process:

- naive: one Hugging Face forward per (context + option);
- lm-eval: lm-evaluation-harness's HFLM (batch size 32) `loglikelihood` on the same (context, option) requests;
- ours/stateless: llm_sampler.score_many with `lambda x: hf(x).logits`;
- ours/IncrementalHF: score_many with llm_sampler.hf.IncrementalHF (HF's own KV cache);
- ours/part: score_many with an llm_model_parts Part's incremental forward_func (forward_packed).

Two sets: 40 short questions (2-5 options) and an MMLU-like set (contexts of 370-500 tokens, 4 one-token
options). Checks that every method gives the naive log-likelihoods (max abs diff) and the same picks, prints
the times and the ratios to lm-eval, and saves tools/bench/results/scoring.json.

    .venv/bin/python tools/bench/bench_scoring.py [--quick] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import fixtures  # noqa: E402
from scoring_questions import MMLU_LIKE, SHORT  # noqa: E402

import llm_sampler  # noqa: E402

Requests = list[tuple[str, list[str]]]


def naive(model: Any, tokenizer: Any, questions: Requests) -> list[list[float]]:
    encoder = llm_sampler.TextEncoder(tokenizer)
    out = []
    for context, options in questions:
        lls = []
        for option in options:
            ctx, cont = encoder.pair(context, option)
            logits = model(torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
            lls.append(sum(float(logits[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        out.append(lls)
    return out


def lm_eval_runner(model: Any, tokenizer: Any) -> Callable[[Requests], list[list[float]]] | None:
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        logging.warning("lm-eval is not installed: pip install -r tools/bench/requirements.txt")
        return None
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=32, device="cpu")

    def run(questions: Requests) -> list[list[float]]:
        reqs = [
            Instance("loglikelihood", {}, (context, option), i)
            for i, (context, options) in enumerate(questions)
            for option in options
        ]
        flat = [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
        out, k = [], 0
        for _, options in questions:
            out.append(flat[k : k + len(options)])
            k += len(options)
        return out

    return run


def ours(forward_func: Any, tokenizer: Any) -> Callable[[Requests], list[list[float]]]:
    def run(questions: Requests) -> list[list[float]]:
        return [s.loglikelihoods for s in llm_sampler.score_many(forward_func, tokenizer, questions)]

    return run


def load_part_forward(path: Path) -> tuple[Any, str]:
    try:
        import llm_model_parts

        part = llm_model_parts.load_part(path, "f")
        return part.as_forward_func(max_seq_len=1024), ""
    except Exception as e:  # the column is reported as missing, with the reason
        return None, f"{type(e).__name__}: {e}"


def timed(
    fn: Callable[[Requests], list[list[float]]], questions: Requests, repeat: int
) -> tuple[float, list[list[float]]]:
    best, result = float("inf"), []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn(questions)
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a few questions of each set, one repeat")
    parser.add_argument("--repeat", type=int, default=1, help="runs per method (the best is reported)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(fixtures.real_checkpoint("smollm2"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    part_forward, part_error = load_part_forward(path)

    methods: dict[str, Callable[[Requests], list[list[float]]] | None] = {
        "naive": lambda q: naive(model, tokenizer, q),
        "lm-eval": lm_eval_runner(model, tokenizer),
        "ours/stateless": ours(lambda x: model(x).logits, tokenizer),
        "ours/IncrementalHF": ours(llm_sampler.IncrementalHF(model), tokenizer),
        "ours/part": None if part_forward is None else ours(part_forward, tokenizer),
    }
    sets = {"short (40 questions)": SHORT, "MMLU-like (16 questions)": MMLU_LIKE}
    if args.quick:
        sets = {"short (quick)": SHORT[:6], "MMLU-like (quick)": MMLU_LIKE[:2]}
    report: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct",
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "threads": args.threads,
        "sets": {},
    }
    if part_error:
        report["part_error"] = part_error
        print(f"ours/part unavailable: {part_error}")
    with torch.inference_mode():
        for fn in methods.values():  # warm-up: first calls allocate, load kernels, build HFLM state
            if fn is not None:
                fn(SHORT[:2])
        for set_name, questions in sets.items():
            rows: dict[str, Any] = {}
            ref: list[list[float]] = []
            for name, fn in methods.items():
                if fn is None:
                    continue
                seconds, lls = timed(fn, questions, 1 if args.quick else args.repeat)
                if name == "naive":
                    ref = lls
                diff = max(
                    abs(a - b) for r, o in zip(ref, lls, strict=True) for a, b in zip(r, o, strict=True)
                )
                same_picks = all(
                    max(range(len(r)), key=r.__getitem__) == max(range(len(o)), key=o.__getitem__)
                    for r, o in zip(ref, lls, strict=True)
                )
                rows[name] = {"seconds": seconds, "max_abs_diff_vs_naive": diff, "same_picks": same_picks}
            base = rows.get("lm-eval", rows["naive"])["seconds"]
            for row in rows.values():
                row["speedup_vs_lm_eval"] = base / row["seconds"]
                row["speedup_vs_naive"] = rows["naive"]["seconds"] / row["seconds"]
            report["sets"][set_name] = rows
            print(f"\n{set_name}: {sum(len(o) for _, o in questions)} options")
            print(
                f"{'method':<20} {'seconds':>8} {'x lm-eval':>10} {'x naive':>8} {'max |diff|':>11} {'picks':>6}"
            )
            for name, row in rows.items():
                print(
                    f"{name:<20} {row['seconds']:8.3f} {row['speedup_vs_lm_eval']:10.2f} {row['speedup_vs_naive']:8.2f} "
                    f"{row['max_abs_diff_vs_naive']:11.2e} {'same' if row['same_picks'] else 'DIFF':>6}"
                )
    out = HERE / "results" / "scoring.json"
    out.parent.mkdir(exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as f:
        json.dump(report, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, out)
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
