"""Loading "b 0-15" of SmolLM2-135M (fp32, hot page cache): llm_sepweight vs the references, side by side.

    python tools/bench/bench_sepweight_load.py [--quick] [--spec "b 0-15"] [--repeats 7]

Rows (all over the same weights, timed in this run, median of the repeats after one warm-up):
- llm_sepweight: `Checkpoint(dir).load(spec)` on a sepweight directory converted from the SmolLM2 fixture;
- safetensors: `safe_open(f, "pt").get_tensor(k)` for every tensor of the same files;
- llm_sepweight 0.10: `llm_sepweight.load(dir, spec)` of the original wheel (`.pth` files via torch.load),
  in a subprocess with the unpacked wheel first on sys.path (it has our import name);
- llm-layer-collector: `load_input_embedding()` + `load_layer_set(0, 14)` on the HF fixture (if installed).

Three columns, so zero-copy is not mistaken for reading speed: "ready" is the time until every tensor
exists (a memory-mapped load may not have read a byte yet); "paged_in" adds reading one byte of every
4 KiB page (the page faults a memory map defers); "copied" adds copying every tensor once into a reused
buffer (every byte read; on a busy 2-core machine this memcpy dominates every row alike).
Throughput = bytes of the part / time.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import fixtures  # noqa: E402

from llm_sepweight import Checkpoint, PartSpec, convert  # noqa: E402

Tensors = dict[str, torch.Tensor]

OLD_SCRIPT = r"""
import json, statistics, sys, time
from collections.abc import Callable
Tensors = dict
sys.path.insert(0, sys.argv[1])
import torch
import llm_sepweight
assert llm_sepweight.__version__.startswith("0.10"), llm_sepweight.__file__
path, spec, repeats = sys.argv[2], sys.argv[3], int(sys.argv[4])
exec(sys.argv[5])
result = measure(lambda: llm_sepweight.load(path, spec).to_dict(), repeats)
flat = llm_sepweight.load(path, spec).to_dict()
result["bytes"] = sum(t.numel() * t.element_size() for t in flat.values())
print(json.dumps(result))
"""


def _old_wheel_dir() -> Path | None:
    """The original llm_sepweight 0.10 unpacked (downloaded once into the fixtures cache)."""
    try:
        return fixtures.original_package("llm-sepweight==0.10.0")
    except Exception as e:  # no registry reachable: the row is skipped with a note
        print(f"note: could not fetch llm-sepweight 0.10.0: {e}")
        return None


def _prepare(cache: Path) -> tuple[Path, Path]:
    """The sepweight directory and the 0.10 `.pth` directory of SmolLM2 (built once)."""
    sw = cache / "smollm2-sepweight"
    if not (sw / "manifest.json").is_file():
        convert(fixtures.real_checkpoint("smollm2"), sw)
    old = cache / "smollm2-sepweight-0.10"
    if not (old / "end.pth").is_file():
        tmp = Path(tempfile.mkdtemp(dir=cache))
        part = Checkpoint(sw).load("f")
        torch.save({k: v.clone() for k, v in (part.begin or {}).items()}, tmp / "begin.pth")
        for i, layer in part.mid.items():
            torch.save({f"h.{i}.{k}": v.clone() for k, v in layer.items()}, tmp / f"mid.{i:05d}.pth")
        torch.save({k: v.clone() for k, v in (part.end or {}).items()}, tmp / "end.pth")
        tmp.rename(old)
    return sw, old


def page_in(tensors: Tensors) -> None:
    # one byte of every 4 KiB page: what a memory map defers (page faults), without a full read
    for t in tensors.values():
        t.reshape(-1).view(torch.uint8)[::4096].sum()


def copy_all(tensors: Tensors, sink: torch.Tensor) -> None:
    # every byte read once: copy each tensor into one reused buffer (memory bandwidth, no allocation)
    for t in tensors.values():
        flat = t.reshape(-1).view(torch.uint8)
        sink[: flat.numel()].copy_(flat)


def measure(load: Callable[[], Tensors], repeats: int) -> dict[str, float]:
    ready, paged, copied = [], [], []
    sink = torch.empty(256 << 20, dtype=torch.uint8)
    for r in range(repeats + 1):  # the first run warms the page cache
        t0 = time.perf_counter()
        tensors = load()
        t1 = time.perf_counter()
        page_in(tensors)
        t2 = time.perf_counter()
        copy_all(tensors, sink)
        t3 = time.perf_counter()
        if r:
            ready.append(t1 - t0)
            paged.append(t2 - t0)
            copied.append(t3 - t0)
        del tensors
    return {
        "ready": statistics.median(ready),
        "paged_in": statistics.median(paged),
        "copied": statistics.median(copied),
    }


# the same measuring code runs in the 0.10 subprocess
TOUCH = "\n\n".join(inspect.getsource(f) for f in (page_in, copy_all, measure))


def _time(load: Callable[[], Tensors], repeats: int) -> dict[str, float]:
    return measure(load, repeats)


def _ours(sw: Path, spec: str) -> Callable[[], Tensors]:
    return lambda: Checkpoint(sw).load(spec).to_dict()


def _safetensors(sw: Path, spec: str) -> Callable[[], Tensors]:
    from safetensors import safe_open

    files = [sw / f for f in Checkpoint(sw).files(spec)]

    def load() -> Tensors:
        out = {}
        for f in files:
            with safe_open(f, framework="pt") as st:
                for k in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    out[f"{f.name}:{k}"] = st.get_tensor(k)
        return out

    return load


def _collector(hf: Path, spec: PartSpec, cache: Path) -> Callable[[], Tensors] | None:
    try:
        from llm_layer_collector import LlmLayerCollector
    except ImportError as e:
        print(f"note: llm-layer-collector not installed ({e}); skipping it (pip install llm-layer-collector)")
        return None
    layers = spec.layers

    def load() -> Tensors:
        collector = LlmLayerCollector(hf, cache_file=cache / "collector-cache.json", dtype=torch.float32)
        out = {}
        if spec.begin:
            out.update({f"begin.{k}": v for k, v in collector.load_input_embedding().state_dict().items()})
        for i, layer in zip(layers, collector.load_layer_set(layers[0], layers[-1]), strict=True):
            out.update({f"mid.{i}.{k}": v for k, v in layer.cls.state_dict().items()})
        return out

    try:
        load()
    except Exception as e:  # e.g. it needs the hub for something: report and go on
        print(
            f"note: llm-layer-collector could not load the model offline ({type(e).__name__}: {e}); skipping it"
        )
        return None
    return load


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 repeats")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--spec", default="b 0-15")
    args = parser.parse_args()
    repeats = 2 if args.quick else args.repeats
    cache = fixtures.cache_dir() / "bench"
    cache.mkdir(exist_ok=True)
    sw, old = _prepare(cache)
    spec = PartSpec.parse(args.spec)
    nbytes = Checkpoint(sw).load(spec).nbytes
    rows: dict[str, dict[str, float]] = {}
    rows["llm_sepweight"] = _time(_ours(sw, args.spec), repeats)
    rows["safetensors get_tensor"] = _time(_safetensors(sw, args.spec), repeats)
    wheel = _old_wheel_dir()
    if wheel is None:
        print("note: the llm_sepweight 0.10 wheel could not be fetched; skipping it")
    else:
        r = subprocess.run(
            [sys.executable, "-c", OLD_SCRIPT, str(wheel), str(old), args.spec, str(repeats), TOUCH],
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(r.stdout.strip().splitlines()[-1])
        if result["bytes"] != nbytes:
            print(f"note: 0.10 loaded {result['bytes']} bytes, ours {nbytes}")
        rows["llm_sepweight 0.10 (.pth)"] = {k: result[k] for k in ("ready", "paged_in", "copied")}
    collector = _collector(fixtures.real_checkpoint("smollm2"), spec, cache)
    if collector is not None:
        rows["llm-layer-collector"] = _time(collector, repeats)

    ours = rows["llm_sepweight"]
    cols = ("ready", "paged_in", "copied")
    print(f"\nspec {args.spec!r}: {nbytes / 1e6:.0f} MB fp32, hot page cache, median of {repeats}")
    print(
        "seconds (GB/s) until: tensors ready | every page mapped | every byte copied once; ours/this throughput\n"
    )
    print(f"{'':27}" + "".join(f"{c:>17}" for c in cols) + "".join(f"{'x ' + c:>13}" for c in cols))
    for name, r in rows.items():
        cells = "".join(f"{r[c]:9.3f} ({nbytes / r[c] / 1e9:4.1f})" for c in cols)
        ratios = "".join(f"{r[c] / ours[c]:12.2f}x" for c in cols)
        print(f"{name:27}{cells}{ratios}")
    result_file = ROOT / "tools" / "bench" / "results" / "sepweight_load.json"
    result_file.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "spec": args.spec,
        "bytes": nbytes,
        "repeats": repeats,
        "seconds": rows,
        "GBps": {k: {c: nbytes / v[c] / 1e9 for c in cols} for k, v in rows.items()},
        "ours_over_this_throughput": {k: {c: v[c] / ours[c] for c in cols} for k, v in rows.items()},
    }
    result_file.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"\nsaved {result_file}")


if __name__ == "__main__":
    main()
