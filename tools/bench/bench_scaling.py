"""How time grows: prompt length, batch size and resident budget (SmolLM2-135M fp32, CPU), side by side in one run.

- prompt length: one forward of T tokens, transformers vs an llm_model_parts Part;
- batch size: greedy decode tokens/s for B rows, transformers' `generate` vs llm_sampler over a Part's cache;
- resident budget: a forward of 256 tokens with the decoder layers under llm_offload from a sepweight
  directory (hot page cache) with a budget of N layers (`resident="auto"`: the layers the budget holds
  after the streaming slots stay resident; with N = 30 all of them), against all weights resident.

    python tools/bench/bench_scaling.py [--quick]   # JSON: tools/bench/results/scaling.json, PNGs: docs/img/
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import fixtures  # noqa: E402

import llm_sampler  # noqa: E402
import llm_sepweight  # noqa: E402
from llm_model_parts import load_part  # noqa: E402
from llm_offload import SepweightSource, offload  # noqa: E402

RESULTS = ROOT / "tools" / "bench" / "results" / "scaling.json"
IMG = ROOT / "docs" / "img"


def timed(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sepweight_dir() -> Path:
    out = fixtures.cache_dir() / "bench" / "smollm2-sepweight"
    if not (out / "manifest.json").exists():
        llm_sepweight.convert(fixtures.real_checkpoint("smollm2"), out, progress=False)
    return out


def prompt_lengths(hf: Any, part: Any, lengths: list[int], repeats: int) -> list[dict[str, float]]:
    rows = []
    for t in lengths:
        ids = torch.randint(0, 49152, (1, t), generator=torch.Generator().manual_seed(t))
        hf_s = timed(lambda ids=ids: hf(ids).logits, repeats)
        ours_s = timed(lambda ids=ids: part(ids), repeats)
        rows.append({"tokens": t, "transformers_s": hf_s, "ours_s": ours_s, "ratio": ours_s / hf_s})
        print(f"prompt {t:5d}: transformers {hf_s:.3f} s  ours {ours_s:.3f} s  ratio {ours_s / hf_s:.2f}")
    return rows


def batch_sizes(hf: Any, part: Any, sizes: list[int], new_tokens: int) -> list[dict[str, float]]:
    rows = []
    for b in sizes:
        ids = torch.randint(0, 49152, (b, 32), generator=torch.Generator().manual_seed(b))
        mask = torch.ones_like(ids)

        def run_hf(ids: torch.Tensor = ids, mask: torch.Tensor = mask) -> Any:
            return hf.generate(
                ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=0,
            )  # fmt: skip

        def run_ours(ids: torch.Tensor = ids) -> Any:
            return llm_sampler.generate(part.as_forward_func(), ids, new_tokens, temperature=0)

        hf_s, ours_s = timed(run_hf, 1), timed(run_ours, 1)
        hf_tps, ours_tps = b * new_tokens / hf_s, b * new_tokens / ours_s
        rows.append(
            {"batch": b, "transformers_tok_s": hf_tps, "ours_tok_s": ours_tps, "speedup": ours_tps / hf_tps}
        )
        print(
            f"batch {b:3d}: transformers {hf_tps:7.1f} tok/s  ours {ours_tps:7.1f} tok/s  x{ours_tps / hf_tps:.2f}"
        )
    return rows


def resident_budgets(path: Path, budgets: list[int], repeats: int) -> list[dict[str, float]]:
    ids = torch.randint(0, 49152, (1, 256), generator=torch.Generator().manual_seed(0))
    resident = load_part(path, "f")
    resident_s = timed(lambda: resident(ids), repeats)
    layer_bytes = sum(
        t.numel() * t.element_size() for t in llm_sepweight.Checkpoint(path).layer_state_dict(0).values()
    )
    rows = []
    for n in budgets:
        part = load_part(path, "f")
        handle = offload(part.layers, SepweightSource(path), "cpu", max_resident_bytes=n * layer_bytes)
        streamed_s = timed(lambda part=part: part(ids), repeats)
        resident_s = timed(lambda: resident(ids), repeats)  # again, right after: the machine's load drifts
        handle.remove()
        rows.append(
            {
                "resident_layers": n,
                "streamed_s": streamed_s,
                "resident_s": resident_s,
                "ratio": streamed_s / resident_s,
            }
        )
        print(
            f"budget {n:2d} layers: streamed {streamed_s:.3f} s  resident {resident_s:.3f} s  ratio {streamed_s / resident_s:.2f}"
        )
    return rows


def plot(results: dict[str, Any]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    IMG.mkdir(parents=True, exist_ok=True)
    made = []
    panels = [
        ("prompt_length", "tokens", [("transformers_s", "transformers"), ("ours_s", "llm_model_parts")], "prompt tokens", "forward time (s)"),
        ("batch_size", "batch", [("transformers_tok_s", "transformers generate"), ("ours_tok_s", "llm_sampler + Part")], "batch size", "greedy decode tokens/s"),
        ("resident_budget", "resident_layers", [("streamed_s", "streamed (llm_offload)"), ("resident_s", "all resident")], "layers resident", "forward time, 256 tokens (s)"),
    ]  # fmt: skip
    for key, x, series, xlabel, ylabel in panels:
        rows = results.get(key)
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for field, label in series:
            ax.plot([r[x] for r in rows], [r[field] for r in rows], marker="o", label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"SmolLM2-135M fp32, CPU: {key.replace('_', ' ')}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        out = IMG / f"scaling_{key}.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        made.append(str(out.relative_to(ROOT)))
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fast smoke run")
    parser.add_argument(
        "--resident-only", action="store_true", help="only the resident-budget panel (merged into the JSON)"
    )
    args = parser.parse_args()
    if args.resident_only:
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        with torch.inference_mode():
            results["resident_budget"] = resident_budgets(
                sepweight_dir(), [2, 4, 8, 16, 30], 1 if args.quick else 3
            )
        results["plots"] = plot(results)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2))
        print(f"saved {RESULTS}")
        return
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf_dir = fixtures.real_checkpoint("smollm2")
    sw = sepweight_dir()
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    part = load_part(sw, "f")
    repeats = 1 if args.quick else 3
    results: dict[str, Any] = {"model": "SmolLM2-135M-Instruct fp32 CPU", "threads": torch.get_num_threads()}
    with torch.inference_mode():
        results["prompt_length"] = prompt_lengths(
            hf, part, [32, 128] if args.quick else [32, 64, 128, 256, 512], repeats
        )
        results["batch_size"] = batch_sizes(
            hf, part, [1, 4] if args.quick else [1, 2, 4, 8, 16], 8 if args.quick else 16
        )
        results["resident_budget"] = resident_budgets(
            sw, [2, 8] if args.quick else [2, 4, 8, 16, 30], repeats
        )
    results["plots"] = plot(results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"saved {RESULTS}")


if __name__ == "__main__":
    main()
