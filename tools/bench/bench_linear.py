"""The per-call matmul of llm_model_parts' `Linear` against `F.linear`, and every candidate kernel, on
SmolLM2-135M's weight shapes (fp32, CPU), at the row counts of decoding, batched decoding and prefill.

Each cell is the minimum over interleaved repeats (the least disturbed run on a shared machine) of one
matmul, averaged over enough distinct weights that they do not fit in the caches.

    python tools/bench/bench_linear.py            # JSON in tools/bench/results/linear.json
    python tools/bench/bench_linear.py --quick
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from llm_model_parts.layers.linear import linear

SHAPES = {"qkv_proj": (960, 576), "o_proj": (576, 576), "gate_up_proj": (3072, 576), "down_proj": (576, 1536),
          "lm_head": (49152, 576)}  # fmt: skip
Kernel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KERNELS: dict[str, Kernel] = {
    "F.linear": lambda x, w: F.linear(x, w),
    "ours": lambda x, w: linear(x, w),
    "mv / W@x.T": lambda x, w: torch.mv(w, x[0]) if x.shape[0] == 1 else torch.mm(w, x.t()).t().contiguous(),
    "oneDNN": lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    rows_list = (1, 4, 64) if args.quick else (1, 2, 4, 6, 8, 16, 32, 64, 256)
    repeats = 2 if args.quick else args.repeats
    results = []
    print(f"{'weight':14s} {'rows':>5s} " + " ".join(f"{k:>11s}" for k in KERNELS) + "   F.linear/ours")
    with torch.inference_mode():
        for name, (out_f, in_f) in SHAPES.items():
            count = max(2, int(1e8 // (out_f * in_f * 4)))
            weights = [torch.randn(out_f, in_f) for _ in range(count)]
            for rows in rows_list:
                x = torch.randn(rows, in_f)
                best = dict.fromkeys(KERNELS, float("inf"))
                for _ in range(repeats):
                    for k, f in KERNELS.items():
                        t0 = time.perf_counter()
                        for w in weights:
                            f(x, w)
                        best[k] = min(best[k], (time.perf_counter() - t0) / count * 1e6)
                results.append({"weight": name, "rows": rows, "us": best})
                print(
                    f"{name:14s} {rows:5d} "
                    + " ".join(f"{best[k]:11.1f}" for k in KERNELS)
                    + f"   {best['F.linear'] / best['ours']:8.2f}x"
                )
    out = Path(__file__).parent / "results" / "linear.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"threads": torch.get_num_threads(), "results": results}, indent=2))
    tmp.replace(out)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
