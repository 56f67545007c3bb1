"""The multi-process pipeline (llm_model_parts.pipeline) against one process, side by side in one run.

SmolLM2-135M-Instruct fp32 on CPU, gloo over localhost:
- baseline: one process, `load_part(dir, "f").as_forward_func()` (no pipeline at all);
- 1, 2 and 3 processes, the layers split evenly (`"b 0-15", "15-30 e"` ...), rank 0 driving through
  `PipelineDriver` (output="last": the last position's logits come back);
- per configuration: time to first token (prefill of --prompt tokens, batch 1), greedy decode tokens/s
  (batch 1), and batched throughput (batch --batch of --prompt tokens, then decode) with one micro-batch
  against --batch micro-batches (and prefill chunks), so that the stages overlap;
- per hop: one message rank 0 -> rank 1 -> rank 0 of each size (header + payload), halved.

Several processes on one 2-core machine share the same two cores: this measures the pipeline's overhead and
its overlap, not a multi-GPU or multi-host speed-up (each stage would have its own device there).

    python tools/bench/bench_pipeline.py            # full run; JSON in tools/bench/results/pipeline.json
    python tools/bench/bench_pipeline.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
RESULTS = ROOT / "tools" / "bench" / "results" / "pipeline.json"
CORES = os.cpu_count() or 2


def sepweight_dir() -> Path:
    import fixtures

    from llm_sepweight import convert

    out = fixtures.cache_dir() / "bench" / "smollm2-sepweight"
    if not (out / "manifest.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert(fixtures.real_checkpoint("smollm2"), out)
    return out


def even_plan(world: int, layers: int = 30) -> list[str]:
    cuts = [round(layers * i / world) for i in range(world + 1)]
    specs = [f"{cuts[i]}-{cuts[i + 1]}" for i in range(world)]
    specs[0] = "b " + specs[0]
    specs[-1] += " e"
    return specs


# --- what rank 0 (or the baseline process) measures ------------------------------------------------------------


def _timed(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(f: Any, cfg: dict[str, Any], *, set_micro: Any = None) -> dict[str, float]:
    """TTFT and decode speed at batch 1; batched prefill and decode throughput."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 40000, (1, cfg["prompt"]), generator=g)
    batch = torch.randint(100, 40000, (cfg["batch"], cfg["prompt"]), generator=g)
    out: dict[str, float] = {}

    def prefill(ids: torch.Tensor) -> torch.Tensor:
        f.reset()
        return f(ids)

    prefill(batch)  # warm-up: allocate the caches, first-call costs

    out["ttft_s"] = _timed(lambda: prefill(prompt), cfg["repeat"])

    def decode(ids: torch.Tensor) -> None:
        logits = prefill(ids)
        for _ in range(cfg["decode"]):
            logits = f(logits[:, -1:].argmax(-1))

    # decode time alone: the whole run minus a prefill
    out["decode_tok_s"] = cfg["decode"] / max(
        1e-9, _timed(lambda: decode(prompt), cfg["repeat"]) - out["ttft_s"]
    )
    for micro in (1, cfg["batch"]) if set_micro is not None else (1,):
        tag = f"mb{micro}"
        if set_micro is not None:
            set_micro(micro, cfg["chunk"] if micro > 1 else None)
        t_prefill = _timed(lambda b=batch: prefill(b), cfg["repeat"])
        out[f"batch_prefill_tok_s_{tag}"] = batch.numel() / t_prefill
        t_all = _timed(lambda b=batch: decode(b), cfg["repeat"])
        out[f"batch_decode_tok_s_{tag}"] = cfg["batch"] * cfg["decode"] / max(1e-9, t_all - t_prefill)
    return out


def hop_latency(rank: int, sizes: list[int], repeat: int) -> dict[str, float]:
    """One hop = half a round trip rank 0 -> 1 -> 0 of a header + fp32 payload of `n` floats."""
    from llm_model_parts.pipeline.transport import TAG_DOWN, TAG_RETURN, Command, Header, Link

    out = {}
    for n in sizes:
        x = torch.randn(1, max(1, n // 576), 576) if n >= 576 else torch.randn(1, 1, n)
        if rank == 0:
            down, back = Link(1, TAG_DOWN, 60), Link(1, TAG_RETURN, 60)
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                down.send(Header(Command.FORWARD), [x])
                back.recv()
                times.append(time.perf_counter() - t0)
            down.flush()
            out[str(x.numel() * 4)] = statistics.median(times) / 2
        else:
            up, back = Link(0, TAG_DOWN, 60), Link(0, TAG_RETURN, 60)
            for _ in range(repeat):
                _, tensors = up.recv()
                back.send(Header(Command.RESULT), tensors)
            back.flush()
    return out


def rank_main(args: argparse.Namespace) -> None:
    from llm_model_parts.pipeline import start_pipeline

    cfg = json.loads(args.config)
    torch.set_num_threads(cfg["threads"])
    rank = int(os.environ["RANK"])
    if args.role == "hop":
        import torch.distributed as dist

        dist.init_process_group("gloo")
        result = hop_latency(rank, cfg["sizes"], cfg["hop_repeat"])
        if rank == 0:
            Path(args.out).write_text(json.dumps(result))
        dist.destroy_process_group()
        return
    driver = start_pipeline(
        cfg["model"], cfg["plan"], device="cpu", dtype=torch.float32, max_seq_len=cfg["prompt"] + cfg["decode"] + 8,
        output="last", timeout=300,
    )  # fmt: skip
    if driver is None:
        return

    def set_micro(micro: int, chunk: int | None) -> None:
        driver.micro_batches, driver.prefill_chunk = micro, chunk

    with driver:
        result = measure(driver, cfg, set_micro=set_micro)
    Path(args.out).write_text(json.dumps(result))


# --- the orchestrator ------------------------------------------------------------------------------------------


def launch(world: int, role: str, cfg: dict[str, Any], wall: float) -> dict[str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    procs = []
    for rank in range(world):
        env = dict(os.environ)
        env.update(
            RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
            OMP_NUM_THREADS=str(cfg["threads"]),
        )  # fmt: skip
        argv = [sys.executable, __file__, "--role", role, "--config", json.dumps(cfg), "--out", str(out)]
        procs.append(subprocess.Popen(argv, env=env, start_new_session=True))
    deadline = time.monotonic() + wall
    try:
        for p in procs:
            p.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    if any(p.returncode for p in procs):
        raise RuntimeError(
            f"{role} run with {world} processes failed: exit codes {[p.returncode for p in procs]}"
        )
    result = json.loads(out.read_text())
    out.unlink()
    return result  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--role", choices=["rank", "hop"], default=None)
    ap.add_argument("--config", default="{}")
    ap.add_argument("--out", default="")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (baseline included)")
    args = ap.parse_args()
    if args.role is not None:
        rank_main(args)
        return
    model = sepweight_dir()
    cfg: dict[str, Any] = {
        "model": str(model),
        "prompt": 32 if args.quick else 96,
        "decode": 8 if args.quick else 16,
        "batch": 4,
        "chunk": 16 if args.quick else 32,
        "repeat": 1 if args.quick else 2,
        "sizes": [576, 576 * 128, 49152, 576 * 512],
        "hop_repeat": 20 if args.quick else 200,
    }
    worlds = [1, 2] if args.quick else [1, 2, 3]

    # baseline: one process, the plain part, no pipeline, all cores
    from llm_model_parts import load_part

    torch.set_num_threads(args.threads)
    part = load_part(model, "f", dtype=torch.float32)
    baseline = measure(part.as_forward_func(max_seq_len=cfg["prompt"] + cfg["decode"] + 8), cfg)
    del part
    rows: dict[str, dict[str, float]] = {"baseline (1 process, no pipeline)": baseline}
    for world in worlds:
        run = dict(cfg, plan=even_plan(world), threads=args.threads)
        rows[f"pipeline, {world} process{'es' if world > 1 else ''}"] = launch(world, "rank", run, wall=900)
    hops = launch(2, "hop", dict(cfg, threads=1), wall=300)

    keys = list(baseline) + [k for k in next(iter(rows.values())) if k not in baseline]
    all_keys = sorted(
        {k for r in rows.values() for k in r}, key=lambda k: (keys.index(k) if k in keys else 99, k)
    )
    print(
        f"\nSmolLM2-135M fp32, CPU ({CORES} cores), gloo on localhost; prompt {cfg['prompt']}, decode {cfg['decode']}, batch {cfg['batch']}"
    )
    print(f"{'configuration':40s}" + "".join(f"{k:>26s}" for k in all_keys))
    for name, r in rows.items():
        cells = []
        for k in all_keys:
            if k not in r:
                cells.append(f"{'-':>26s}")
                continue
            ref = baseline.get(
                k, baseline.get("batch_prefill_tok_s_mb1" if "prefill" in k else "batch_decode_tok_s_mb1")
            )
            ratio = (ref / r[k]) if k == "ttft_s" else (r[k] / ref)
            cells.append(f"{r[k]:>14.3f} ({ratio:5.2f}x)" + " " * 3)
        print(f"{name:40s}" + "".join(cells))
    print("(ratio: against the baseline, > 1 is better; ttft in seconds, the rest in tokens/s)")
    print("\nper hop (header + fp32 payload, localhost gloo, half a round trip):")
    for size, seconds in hops.items():
        print(f"  {int(size):>10d} bytes  {seconds * 1e6:9.1f} us  {int(size) / seconds / 1e9:6.2f} GB/s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps({"config": cfg, "cores": CORES, "rows": rows, "hop_seconds": hops}, indent=1)
    )
    print(f"\nsaved {RESULTS}")


if __name__ == "__main__":
    main()
