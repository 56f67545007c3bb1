"""llm_offload against resident weights, a naive load-then-compute loop and accelerate, side by side in one run.

CPU (always): SmolLM2-135M-Instruct fp32 from a sepweight directory, the HF model's decoder layers streamed with
at most 4 layers resident, forward of 256 tokens.
- hot: the layer files are in the page cache but not in the process. Streamed (memory-mapped, zero-copy;
  and read into reused buffers) against the same model with every weight resident, and accelerate's
  `disk_offload` as a reference row.
- cold: before every forward each layer file is `fsync`ed and dropped from the page cache
  (`POSIX_FADV_DONTNEED`). Streamed against a naive loop (load a layer's file, compute, free), with the
  overlap the stats report.
- peak anonymous memory (RssAnon sampled during one forward, minus the value before) of each, against the
  resident budget plus the activations (the resident model's own peak during the same forward).

GPU (only when CUDA is available; not run where there is none): a Llama-7B-shaped stack (32 layers, bf16,
random weights) streamed from pinned CPU memory with at most 4 layers on the device: effective host->device
bandwidth against a plain pinned `copy_`, time per forward against max(compute resident, transfer), and
accelerate's `cpu_offload` in the same run.

    python tools/bench/bench_offload.py            # full run; JSON in tools/bench/results/offload.json
    python tools/bench/bench_offload.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import fixtures  # noqa: E402

from llm_offload import CpuSource, SepweightSource, offload  # noqa: E402

RESULTS = ROOT / "tools" / "bench" / "results" / "offload.json"
RESIDENT_LAYERS = 4


# -- helpers ------------------------------------------------------------------------------------------------


def sepweight_dir() -> Path:
    """SmolLM2 converted to a sepweight directory once, in the fixtures cache."""
    from llm_sepweight import convert

    out = fixtures.cache_dir() / "bench" / "smollm2-sepweight"
    if not (out / "manifest.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert(fixtures.real_checkpoint("smollm2"), out, progress=False)
    return out


def load_hf(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def drop_from_page_cache(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_into_page_cache(files: list[Path]) -> None:
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def peak_anon() -> Iterator[dict[str, int]]:
    """Samples RssAnon every millisecond; yields a dict that holds the peak increase afterwards."""
    out = {"peak": 0}
    base = rss_anon()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            out["peak"] = max(out["peak"], rss_anon() - base)
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield out
    finally:
        stop.set()
        t.join()
        out["peak"] = max(out["peak"], rss_anon() - base)


def trim_heap() -> None:
    """Give freed heap memory back to the system, so RssAnon shows what is in use."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def memory_probe(variant: str, tokens: int, budget: int) -> int:
    """Peak RssAnon increase during one forward of `variant`, measured in a fresh process."""
    cmd = [sys.executable, __file__, "--probe", variant, "--tokens", str(tokens), "--budget", str(budget)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak"])


def run_probe(variant: str, tokens: int, budget: int) -> None:
    torch.set_num_threads(2)
    sw = sepweight_dir()
    model = load_hf(Path(fixtures.real_checkpoint("smollm2")))
    n_layers = len(model.model.layers)
    if variant == "streamed":
        offload(model.model.layers, SepweightSource(sw), "cpu", prefetch_depth=3, max_resident_bytes=budget)
    elif variant == "streamed_read":
        offload(
            model.model.layers,
            SepweightSource(sw, mmap=False),
            "cpu",
            prefetch_depth=3,
            max_resident_bytes=budget,
        )
    elif variant == "naive":
        NaiveLoop(model.model.layers, [sw / f"mid.{i:05d}.safetensors" for i in range(n_layers)])
    ids = torch.randint(100, 40000, (1, tokens), generator=torch.Generator().manual_seed(0))
    gc.collect()
    trim_heap()
    with peak_anon() as peak, torch.inference_mode():
        model(ids, use_cache=False)
    print(json.dumps(peak))


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class NaiveLoop:
    """Load-then-compute, as people write it: before a layer runs, read its file; after, free it."""

    def __init__(self, layers: Any, files: list[Path]) -> None:
        from safetensors.torch import load_file

        self.load_s = 0.0
        for layer, f in zip(layers, files, strict=True):
            layer.to("meta")

            def pre(module: Any, args: Any, f: Path = f) -> None:
                t0 = time.perf_counter()
                module.load_state_dict(load_file(f), assign=True)
                self.load_s += time.perf_counter() - t0

            def post(module: Any, args: Any, output: Any) -> None:
                module.to("meta")

            layer.register_forward_pre_hook(pre)
            layer.register_forward_hook(post)


# -- CPU ----------------------------------------------------------------------------------------------------


def cpu_bench(quick: bool, reps: int | None = None) -> dict[str, Any]:
    torch.set_num_threads(2)
    hf_dir = Path(fixtures.real_checkpoint("smollm2"))
    sw = sepweight_dir()
    n_layers = json.loads((sw / "manifest.json").read_text())["num_layers"]
    files = [sw / f"mid.{i:05d}.safetensors" for i in range(n_layers)]
    tokens = 64 if quick else 256
    reps = reps or (2 if quick else 5)
    ids = torch.randint(100, 40000, (1, tokens), generator=torch.Generator().manual_seed(0))

    resident = load_hf(hf_dir)
    layer_bytes = sum(p.nbytes for p in resident.model.layers[0].parameters())
    budget = RESIDENT_LAYERS * (layer_bytes + (64 << 10))  # 4 layers (+ alignment slack)

    streamed = load_hf(hf_dir)
    off = offload(
        streamed.model.layers, SepweightSource(sw), "cpu", prefetch_depth=3, max_resident_bytes=budget
    )
    streamed_read = load_hf(hf_dir)
    off_read = offload(
        streamed_read.model.layers,
        SepweightSource(sw, mmap=False),
        "cpu",
        prefetch_depth=3,
        max_resident_bytes=budget,
    )
    naive_model = load_hf(hf_dir)
    naive = NaiveLoop(naive_model.model.layers, files)

    accel_dir = Path(tempfile.mkdtemp(prefix="offload-bench-accelerate-"))
    accel = None
    try:
        from accelerate import disk_offload

        accel = disk_offload(load_hf(hf_dir), accel_dir, execution_device=torch.device("cpu"))
    except Exception as e:  # a reference row only
        print(f"accelerate disk_offload unavailable: {type(e).__name__}: {e}")

    def fwd(model: Any) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode():
                return model(ids, use_cache=False).logits

        return run

    with torch.inference_mode():
        want = resident(ids, use_cache=False).logits
        for name, model in [("streamed", streamed), ("streamed_read", streamed_read), ("naive", naive_model)]:
            got = model(ids, use_cache=False).logits
            assert torch.equal(got, want), f"{name}: logits differ from the resident model"
        if accel is not None:
            accel(ids, use_cache=False)

    # (a) hot: files in the page cache, not in the process
    read_into_page_cache(files)
    hot: dict[str, list[float]] = {"resident": [], "streamed": [], "streamed_read": [], "accelerate_disk": []}
    for _ in range(reps):
        hot["resident"].append(timed(fwd(resident)))
        off.evict()
        hot["streamed"].append(timed(fwd(streamed)))
        off_read.evict()
        hot["streamed_read"].append(timed(fwd(streamed_read)))
        if accel is not None:
            hot["accelerate_disk"].append(timed(fwd(accel)))
    off.reset_stats()
    fwd(streamed)()
    hot_stats = off.stats

    # (b) cold: dropped from the page cache before every forward
    cold: dict[str, list[float]] = {"naive": [], "streamed": [], "streamed_read": []}
    naive_load: list[float] = []
    cold_stats = []
    for _ in range(reps):
        drop_from_page_cache(files)
        naive.load_s = 0.0
        cold["naive"].append(timed(fwd(naive_model)))
        naive_load.append(naive.load_s)
        off.evict()  # pages still mapped are not dropped: unmap ours first
        drop_from_page_cache(files)
        off.reset_stats()
        cold["streamed"].append(timed(fwd(streamed)))
        cold_stats.append(off.stats)
        off_read.evict()
        drop_from_page_cache(files)
        cold["streamed_read"].append(timed(fwd(streamed_read)))

    # peak anonymous memory during one forward (hot files), each in a fresh process: freed memory that the
    # allocator keeps would hide the peak here
    read_into_page_cache(files)
    memory = {
        name: memory_probe(name, tokens, budget)
        for name in ("resident", "streamed", "streamed_read", "naive")
    }

    med = {k: statistics.median(v) for k, v in hot.items() if v}
    cmed = {k: statistics.median(v) for k, v in cold.items()}

    def ratio(times: dict[str, list[float]], name: str, ref: str) -> float:
        """Median over rounds of the ratio within a round (each round runs both back to back)."""
        if not times.get(name):
            return float("nan")
        return statistics.median(a / b for a, b in zip(times[name], times[ref], strict=True))

    cold_pick = cold_stats[len(cold_stats) // 2]
    activations = memory["resident"]
    results = {
        "tokens": tokens,
        "layers": n_layers,
        "layer_bytes": layer_bytes,
        "max_resident_bytes": budget,
        "hot_s": med,
        "hot_ratio_streamed_vs_resident": ratio(hot, "streamed", "resident"),
        "hot_ratio_streamed_read_vs_resident": ratio(hot, "streamed_read", "resident"),
        "hot_ratio_accelerate_disk_vs_resident": ratio(hot, "accelerate_disk", "resident"),
        "hot_stall_share": hot_stats.stall_s / med["streamed"],
        "hot_stats": hot_stats.as_dict(),
        "cold_s": cmed,
        "cold_ratio_streamed_vs_naive": ratio(cold, "streamed", "naive"),
        "cold_ratio_streamed_read_vs_naive": ratio(cold, "streamed_read", "naive"),
        "cold_naive_load_s": statistics.median(naive_load),
        "cold_overlap": cold_pick.overlap,
        "cold_stats": {k: v for k, v in cold_pick.as_dict().items() if k != "layers"},
        "peak_anon_bytes": memory,
        "peak_anon_limit_bytes": budget + activations,
    }
    for h in (off, off_read):
        h.remove()
    with contextlib.suppress(OSError):
        for f in accel_dir.iterdir():
            f.unlink()
        accel_dir.rmdir()

    print(f"\nCPU: SmolLM2-135M fp32, {n_layers} layers of {layer_bytes / 1e6:.1f} MB, forward of {tokens} tokens, "
          f"max_resident_bytes = {RESIDENT_LAYERS} layers ({budget / 1e6:.1f} MB); median of {reps}")  # fmt: skip
    print(f"{'case':<44} {'time s':>8} {'ratio':>7}")
    r = results
    rows = [
        ("hot: resident (reference)", med["resident"], 1.0),
        ("hot: streamed, mmap zero-copy", med["streamed"], r["hot_ratio_streamed_vs_resident"]),
        ("hot: streamed, read into buffers", med["streamed_read"], r["hot_ratio_streamed_read_vs_resident"]),
    ]
    if "accelerate_disk" in med:
        rows.append(
            (
                "hot: accelerate disk_offload",
                med["accelerate_disk"],
                r["hot_ratio_accelerate_disk_vs_resident"],
            )
        )
    rows += [
        ("cold: naive load-then-compute (reference)", cmed["naive"], 1.0),
        ("cold: streamed, mmap zero-copy", cmed["streamed"], r["cold_ratio_streamed_vs_naive"]),
        ("cold: streamed, read into buffers", cmed["streamed_read"], r["cold_ratio_streamed_read_vs_naive"]),
    ]
    print("(ratio: median over rounds of the ratio within a round)")
    for name, t, x in rows:
        print(f"{name:<44} {t:>8.3f} {x:>6.3f}x")
    print(f"hot: the streamed forward waited for weights {hot_stats.stall_s:.3f} s "
          f"({results['hot_stall_share']:.1%} of its time)")  # fmt: skip
    print(f"cold: naive spends {results['cold_naive_load_s']:.3f} s loading; streamed stalls "
          f"{cold_pick.stall_s:.3f} s of {cold_pick.transfer_s:.3f} s transfer (overlap {cold_pick.overlap:.0%})")  # fmt: skip
    print("peak anonymous memory during a forward (MB): "
          + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in memory.items())
          + f"; limit = budget + activations = {(budget + activations) / 1e6:.1f}")  # fmt: skip
    return results


def block_bench(quick: bool) -> dict[str, Any]:
    """Decode throughput with N sequences: the block schedule (each layer fetched once per step for all of
    them) against running the N micro-batches one after another (each forward fetches every layer)."""
    torch.set_num_threads(2)
    hf_dir = Path(fixtures.real_checkpoint("smollm2"))
    sw = sepweight_dir()
    model = load_hf(hf_dir)
    layer_bytes = sum(p.nbytes for p in model.model.layers[0].parameters())
    budget = RESIDENT_LAYERS * (layer_bytes + (64 << 10))
    off = offload(model.model.layers, SepweightSource(sw), "cpu", prefetch_depth=3, max_resident_bytes=budget)
    steps = 2 if quick else 4
    out: dict[str, Any] = {}
    print(f"\nblock schedule: decode {steps} steps of N sequences (1 each), streamed, hot files")
    print(
        f"{'N':>3} {'one after another tok/s':>24} {'block schedule tok/s':>21} {'speed-up':>9} {'loads/step':>11}"
    )
    for n in (1, 4) if quick else (1, 4, 8):
        prompts = [
            torch.randint(100, 40000, (1, 8), generator=torch.Generator().manual_seed(j)) for j in range(n)
        ]
        timings = {}
        loads = {}
        for mode in ("sequential", "blocks"):
            caches: list[Any] = [None] * n
            nxt = list(prompts)

            def step(j: int, caches: list[Any] = caches, nxt: list[torch.Tensor] = nxt) -> torch.Tensor:
                o = model(nxt[j], past_key_values=caches[j], use_cache=True)
                caches[j] = o.past_key_values
                return o.logits[:, -1:].argmax(-1)

            with torch.inference_mode():
                nxt[:] = off.run_blocks(range(n), step)  # prefill, not timed
                off.reset_stats()
                t0 = time.perf_counter()
                for _ in range(steps):
                    nxt[:] = (
                        off.run_blocks(range(n), step) if mode == "blocks" else [step(j) for j in range(n)]
                    )
                timings[mode] = time.perf_counter() - t0
                loads[mode] = off.stats.loads / steps
        tps = {m: n * steps / t for m, t in timings.items()}
        out[str(n)] = {"tok_s": tps, "loads_per_step": loads}
        print(f"{n:>3} {tps['sequential']:>24.2f} {tps['blocks']:>21.2f} {tps['blocks'] / tps['sequential']:>8.2f}x "
              f"{loads['sequential']:>5.0f}/{loads['blocks']:<5.0f}")  # fmt: skip
    off.remove()
    return out


# -- GPU ----------------------------------------------------------------------------------------------------


def gpu_bench(quick: bool, device: str = "cuda") -> dict[str, Any]:
    """Llama-7B-shaped layers, bf16, random, streamed from pinned CPU memory to the GPU.

    `device="cpu"` (`--dry-run-gpu-section`) runs the same code on tiny layers on the CPU, to check the script.
    """
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    dev = torch.device(device)
    on_gpu = dev.type == "cuda"
    n_layers = 8 if quick else 32
    hidden, inter, heads = (4096, 11008, 32) if on_gpu else (64, 128, 4)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=heads,
                      num_hidden_layers=n_layers, max_position_embeddings=4096)  # fmt: skip
    cfg._attn_implementation = "sdpa"
    tokens = 512 if on_gpu else 16
    torch.manual_seed(0)

    def make_layer(i: int) -> Any:
        with torch.device("meta"):
            layer = LlamaDecoderLayer(cfg, i).to(torch.bfloat16)
        layer.to_empty(device="cpu")
        for p in layer.parameters():
            p.data.normal_(0, 0.02)
        return layer.eval()

    layers = torch.nn.ModuleList(make_layer(i) for i in range(n_layers))
    source = CpuSource.from_modules(layers, pin=on_gpu)
    layer_bytes = source.layer_nbytes(0)
    total_bytes = layer_bytes * n_layers
    rotary = LlamaRotaryEmbedding(cfg).to(dev)
    h0 = torch.randn(1, tokens, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
    pos = torch.arange(tokens, device=dev)[None]
    cos_sin = rotary(h0, pos)

    def run(stack: Any) -> torch.Tensor:
        h = h0
        with torch.inference_mode():
            for layer in stack:
                h = layer(h, position_embeddings=cos_sin, attention_mask=None, position_ids=pos)
                h = h[0] if isinstance(h, tuple) else h
        return h

    def cuda_time(fn: Callable[[], Any], reps: int) -> float:
        if not on_gpu:
            fn()
            return statistics.median(timed(fn) for _ in range(reps))
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    reps = 3 if quick else 5
    # plain pinned copy_ of the same bytes, layer by layer, into one preallocated buffer
    host = [torch.empty(layer_bytes, dtype=torch.uint8, pin_memory=on_gpu) for _ in range(2)]
    buf = torch.empty(layer_bytes, dtype=torch.uint8, device=dev)

    def plain_copy() -> None:
        for i in range(n_layers):
            buf.copy_(host[i % 2], non_blocking=True)

    copy_s = cuda_time(plain_copy, reps)
    copy_bw = total_bytes / copy_s

    # compute with the weights resident: 4 layers on the device, called in turn n_layers times
    resident_stack = [make_layer(i).to(dev) for i in range(min(4, n_layers))]
    in_turn = [resident_stack[i % len(resident_stack)] for i in range(n_layers)]
    compute_s = cuda_time(lambda: run(in_turn), reps)
    in_turn.clear()
    resident_stack.clear()

    off = offload(
        layers, source, dev, prefetch_depth=3, max_resident_bytes=RESIDENT_LAYERS * (layer_bytes + (1 << 20))
    )
    streamed_s = cuda_time(lambda: run(layers), reps)
    off.reset_stats()
    run(layers)
    stats = off.stats
    off.remove(materialize=False)

    accel_s = float("nan")
    try:
        from accelerate import cpu_offload

        accel_layers = torch.nn.ModuleList(make_layer(i) for i in range(n_layers))
        for layer in accel_layers:
            cpu_offload(layer, execution_device=dev)
        accel_s = cuda_time(lambda: run(accel_layers), max(1, reps // 2))
    except Exception as e:
        print(f"accelerate cpu_offload unavailable: {type(e).__name__}: {e}")

    bound = max(compute_s, copy_s)
    results = {
        "device": torch.cuda.get_device_name(dev) if on_gpu else "cpu (dry run)",
        "layers": n_layers,
        "layer_bytes": layer_bytes,
        "tokens": tokens,
        "plain_copy_s": copy_s,
        "plain_copy_GBps": copy_bw / 1e9,
        "compute_resident_s": compute_s,
        "streamed_s": streamed_s,
        "streamed_effective_GBps": total_bytes / streamed_s / 1e9,
        "bandwidth_share_of_plain_copy": copy_s / streamed_s,
        "streamed_vs_bound": streamed_s / bound,
        "accelerate_cpu_offload_s": accel_s,
        "stats": {k: v for k, v in stats.as_dict().items() if k != "layers"},
    }
    print(f"\nGPU: {results['device']}, {n_layers} Llama-7B layers bf16 ({layer_bytes / 1e6:.0f} MB each), "
          f"{tokens} tokens, <= {RESIDENT_LAYERS} layers on the device")  # fmt: skip
    print(
        f"plain pinned copy_: {copy_s:.3f} s ({copy_bw / 1e9:.1f} GB/s); compute resident: {compute_s:.3f} s"
    )
    print(f"streamed: {streamed_s:.3f} s ({results['streamed_effective_GBps']:.1f} GB/s, "
          f"{results['bandwidth_share_of_plain_copy']:.0%} of plain copy); vs max(compute, transfer): "
          f"{results['streamed_vs_bound']:.3f}x; accelerate cpu_offload: {accel_s:.3f} s")  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fast smoke run")
    parser.add_argument("--skip-cpu", action="store_true", help="only the GPU section")
    parser.add_argument("--reps", type=int, default=None, help="rounds of the CPU timings (default 5)")
    parser.add_argument(
        "--blocks-only", action="store_true", help="only the block schedule rows (no JSON saved)"
    )
    parser.add_argument(
        "--dry-run-gpu-section", action="store_true", help="the GPU section's code, tiny, on CPU"
    )
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # internal: one memory measurement
    parser.add_argument("--tokens", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        run_probe(args.probe, args.tokens, args.budget)
        return
    results: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "quick": args.quick,
    }
    if args.blocks_only:
        results["blocks"] = block_bench(args.quick)
        print(json.dumps(results["blocks"]))
        return
    if args.dry_run_gpu_section:
        gpu_bench(quick=True, device="cpu")
        return
    if not args.skip_cpu:
        results["cpu"] = cpu_bench(args.quick, args.reps)
        results["blocks"] = block_bench(args.quick)
    if torch.cuda.is_available():
        results["gpu"] = gpu_bench(args.quick)
    else:
        print("\nGPU section skipped: CUDA is not available")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nsaved {RESULTS}")


if __name__ == "__main__":
    main()
