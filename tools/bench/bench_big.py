"""A model larger than RAM: a 31.7 GB checkpoint (Qwen2.5-14B shapes, bf16) on the 24 GB, 2-core machine.

Side by side in one run, JSON in tools/bench/results/big.json:
- the disk's limit: a plain sequential O_DIRECT read of the same shard files (`disk_read_bw`);
- llm_offload streaming the decoder layers straight from the HF shards (O_DIRECT, reused buffers, a byte
  budget of a few layers, embeddings and head resident), a `llm_model_parts` Part computing in bf16:
  batch-1 decode, batched decode of 8 prompts of different lengths (one read of each layer per step),
  `llm_sampler.score_many` over 16 multiple-choice questions (one pack: one read of each layer for all);
- accelerate disk offload (transformers `device_map` with the same CPU memory budget) for batch-1 decode,
  and lm-evaluation-harness's HF backend over that model for the same questions;
- llm_offload with the whole model resident against the plain resident Part (SmolLM2-135M fp32).
Each engine runs in its own process (its peak RSS is its own). The page cache: our reads bypass it
(O_DIRECT); for accelerate, which reads through memory maps, the shards' pages are dropped
(POSIX_FADV_DONTNEED) before each timed step and every half second during it, so that it runs under the
same memory budget rather than on up to 20 GB of cached weights.

    python tools/bench/bench_big.py --quick    # under 20 minutes, fixture build included
    python tools/bench/bench_big.py            # more decode steps, batch sizes and budgets
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
RESULTS = ROOT / "tools" / "bench" / "results" / "big.json"
IMG = ROOT / "docs" / "img"

PROMPT = [1, 504, 3458, 314, 4649, 28, 260, 9]  # 8 token ids (SmolLM2 tokenizer, any fit the vocabulary)
SLOTS = 4  # streaming slots of the default budget: the running layer and three read ahead
READERS = 2  # reader threads: two O_DIRECT reads in flight
ACT_BUDGET = 512 << 20  # activation bytes a scoring call may use (both engines sized from it)
TOP_K = 16  # logits compared between the pipeline and the one-process run, per step
LOGIT_RTOL = 0.02  # of the largest of them: bf16 rounds to 2**-8 relative, summed over 48 layers
FEWSHOT = (
    "The following are multiple choice questions about arithmetic, with answers.\n\n"
    "Question: 2 + 2 = ?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
    "Question: 9 - 4 = ?\nA. 5\nB. 6\nC. 4\nD. 3\nAnswer: A\n\n"
    "Question: 3 * 3 = ?\nA. 6\nB. 8\nC. 12\nD. 9\nAnswer: D\n\n"
)


def questions(n: int = 16) -> list[tuple[str, list[str]]]:
    out = []
    for k in range(n):
        a, b = 2 + k % 7, 1 + (3 * k) % 5
        out.append((f"{FEWSHOT}Question: {a} + {b} = ?\nAnswer:", [" A", " B", " C", " D"]))
    return out


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def shards(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def drop_cache(path: Path) -> None:
    import bigmodel

    bigmodel.drop_page_cache(shards(path))


class CacheDropper:
    """Drops the shards' page-cache pages every `period` seconds while it runs (the accelerate runs)."""

    def __init__(self, path: Path, period: float = 0.5) -> None:
        self.path, self.period = path, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            drop_cache(self.path)

    def __enter__(self) -> CacheDropper:
        drop_cache(self.path)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def disk_read_bw(path: Path, chunk: int = 64 << 20, readers: int = 1) -> dict[str, float]:
    """A plain O_DIRECT read of every shard, 64 MB at a time into aligned buffers: sequential with one
    reader, or with `readers` reads in flight (each thread takes the next 64 MB of the same files in order),
    which is what the disk gives a streamer that keeps that many requests queued."""
    tasks = [(f, off) for f in shards(path) for off in range(0, f.stat().st_size, chunk)]
    lock, it, total = threading.Lock(), iter(tasks), [0]

    def work() -> None:
        view = memoryview(mmap.mmap(-1, chunk))  # page-aligned
        fds: dict[Path, int] = {}
        try:
            while True:
                with lock:
                    task = next(it, None)
                if task is None:
                    return
                f, off = task
                fd = fds.get(f)
                if fd is None:
                    fd = fds[f] = os.open(f, os.O_RDONLY | os.O_DIRECT)
                n = os.preadv(fd, [view], off)
                with lock:
                    total[0] += n
        finally:
            for fd in fds.values():
                os.close(fd)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work) for _ in range(readers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    return {"disk_read_bytes": total[0], "disk_read_s": dt, "disk_read_bw": total[0] / dt}


# -- ours: llm_offload + llm_model_parts + llm_sampler ---------------------------------------------------------


def phase_ours(path: Path, quick: bool) -> dict[str, Any]:
    import bigmodel
    import torch

    from llm_sampler import score_many

    torch.set_num_threads(2)
    out: dict[str, Any] = {}
    from llm_sepweight import Checkpoint

    cfg = Checkpoint(path).config
    steps = 2 if quick else 4
    t0 = time.perf_counter()
    part, off = bigmodel.stream_part(
        path, max_resident_bytes=SLOTS * 560_000_000, prefetch_depth=SLOTS - 1, threads=READERS
    )
    out["setup_s"] = time.perf_counter() - t0
    out["max_resident_bytes"] = SLOTS * 560_000_000
    out["slot_bytes"] = off.slot_bytes
    out["resident_bytes"] = sum(t.nbytes for n, t in part.state_dict().items() if not n.startswith("layers."))
    layer_bytes = sum(off.source.plan(i).read_bytes for i in range(len(off.source)))
    out["layer_bytes"] = layer_bytes
    src = off.source

    def decode(batch: list[list[int]], n_steps: int) -> dict[str, Any]:
        f = part.as_forward_func(max_seq_len=64)
        width = max(len(p) for p in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, p in enumerate(batch):
            ids[b, width - len(p) :] = torch.tensor(p)
            mask[b, width - len(p) :] = 1
        with torch.inference_mode():
            t = time.perf_counter()
            logits = f(ids, attention_mask=mask) if not bool(mask.all()) else f(ids)
            prefill = time.perf_counter() - t
            tokens = [logits[:, -1].argmax(-1)]
            top = [logits[0, -1].float().topk(TOP_K)]
            times, reads, stalls = [], [], []
            for _ in range(n_steps):
                src.reset_bytes_read()
                off.reset_stats()
                mask = torch.cat([mask, torch.ones(len(batch), 1, dtype=torch.long)], 1)
                t = time.perf_counter()
                nxt = tokens[-1][:, None]
                logits = f(nxt, attention_mask=mask) if not bool(mask.all()) else f(nxt)
                times.append(time.perf_counter() - t)
                reads.append(src.bytes_read)
                stats = off.stats
                stalls.append(
                    {"stall_s": stats.stall_s, "compute_s": stats.compute_s, "overlap": stats.overlap}
                )
                tokens.append(logits[:, -1].argmax(-1))
                top.append(logits[0, -1].float().topk(TOP_K))
        return {
            "prefill_s": prefill,
            "step_s": times,
            "s_per_step": statistics.median(times),
            "bytes_read_per_step": reads,
            "offload_stats": stalls,
            "tokens": torch.stack(tokens, 1).tolist(),
            "top_ids": [t.indices.tolist() for t in top],  # row 0's highest logits after each call
            "top_logits": [t.values.tolist() for t in top],
        }

    print("ours: batch-1 decode", flush=True)
    one = decode([PROMPT], steps)
    out["decode"] = one
    out["decode_s_per_token"] = one["s_per_step"]
    out["bytes_read_per_pass"] = statistics.median(one["bytes_read_per_step"])
    print(
        f"  {one['s_per_step']:.2f} s/token, {out['bytes_read_per_pass'] / 1e9:.2f} GB read per pass",
        flush=True,
    )

    batch_sizes = [8] if quick else [4, 8, 16]
    out["batch"] = {}
    for bsz in batch_sizes:
        prompts = [[*PROMPT[: 3 + (k % 6)], 100 + k] for k in range(bsz)]  # lengths 4..9
        print(f"ours: batch-{bsz} decode", flush=True)
        res = decode(prompts, steps)
        out["batch"][str(bsz)] = res
        print(f"  {res['s_per_step']:.2f} s/step", flush=True)
    out["batch_decode_batch_size"] = 8
    out["batch_decode_s_per_step"] = out["batch"]["8"]["s_per_step"]

    print("ours: scoring", flush=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    qs = questions()
    per_token = cfg["vocab_size"] * 2 + cfg["hidden_size"] * 2 * 6 + cfg["intermediate_size"] * 2 * 3
    pack_tokens = ACT_BUDGET // per_token
    f = part.as_forward_func(max_seq_len=pack_tokens + 8)
    src.reset_bytes_read()
    with torch.inference_mode():
        t = time.perf_counter()
        scores = score_many(f, tok, qs, pack_tokens=pack_tokens, progress=True)
        dt = time.perf_counter() - t
    out["score"] = {
        "questions": len(qs),
        "seconds": dt,
        "pack_tokens": pack_tokens,
        "bytes_read": src.bytes_read,
        "picks": [s.best() for s in scores],
        "logprobs": [s.loglikelihoods for s in scores],
    }
    out["score_questions_per_s"] = len(qs) / dt
    print(f"  {len(qs) / dt:.3f} questions/s, {src.bytes_read / 1e9:.1f} GB read", flush=True)
    off.remove()
    part = off = f = None  # freed before the next part loads its own embeddings and head

    # The peak under the default budget, before the sweep below holds up to 6 slots.
    out["peak_rss_bytes"] = peak_rss()
    budgets = [1] if quick else [1, 2, 6]  # slots (1 + prefetch depth)
    out["budget"] = {str(SLOTS): one["s_per_step"]}
    for slots in budgets:
        print(f"ours: batch-1 decode with {slots} slot(s)", flush=True)
        part, off = bigmodel.stream_part(
            path,
            max_resident_bytes=slots * 560_000_000,
            prefetch_depth=slots - 1,
            threads=min(READERS, slots),
        )
        src = off.source
        res = decode([PROMPT], 1 if quick else 2)
        out["budget"][str(slots)] = res["s_per_step"]
        off.remove()
        part = off = None
        print(f"  {res['s_per_step']:.2f} s/token", flush=True)
    out["peak_rss_with_sweep_bytes"] = peak_rss()
    return out


# -- accelerate + lm-evaluation-harness -------------------------------------------------------------------------


def phase_accelerate(path: Path, quick: bool, cpu_bytes: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    out: dict[str, Any] = {"max_memory_cpu": cpu_bytes}
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch.bfloat16,
            device_map="auto",
            max_memory={"cpu": cpu_bytes},
            offload_folder=folder,
        ).eval()
        out["setup_s"] = time.perf_counter() - t
        placed = list(model.hf_device_map.values())
        out["device_map"] = {d: placed.count(d) for d in set(placed)}
        out["offload_folder_files"] = len(os.listdir(folder))  # 0: it reads the shards in place
        ids = torch.tensor([PROMPT])
        steps = 2 if quick else 3
        print("accelerate: batch-1 decode", flush=True)
        with torch.inference_mode(), CacheDropper(path):
            t = time.perf_counter()
            res = model(ids, use_cache=True)
            out["prefill_s"] = time.perf_counter() - t
            past, tokens, times = res.past_key_values, [int(res.logits[0, -1].argmax())], []
            for _ in range(steps):
                drop_cache(path)
                t = time.perf_counter()
                res = model(torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
                times.append(time.perf_counter() - t)
                past = res.past_key_values
                tokens.append(int(res.logits[0, -1].argmax()))
        out["step_s"] = times
        out["accelerate_decode_s_per_token"] = statistics.median(times)
        out["tokens"] = tokens
        print(f"  {out['accelerate_decode_s_per_token']:.2f} s/token", flush=True)

        print("lm-evaluation-harness (HF backend over the accelerate model): scoring", flush=True)
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM

        tok = AutoTokenizer.from_pretrained(path)
        qs = questions()
        cfg = model.config
        longest = max(len(tok(c + o).input_ids) for c, opts in qs for o in opts)
        per_row = longest * (cfg.vocab_size * 2 * 2 + cfg.hidden_size * 2 * 6 + cfg.intermediate_size * 2 * 3)
        batch_size = max(1, ACT_BUDGET // per_row)
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
        requests = [
            Instance("loglikelihood", {}, (c, o), idx=k, metadata=("mc", q, 0))
            for q, (c, opts) in enumerate(qs)
            for k, o in enumerate(opts)
        ]
        with torch.inference_mode(), CacheDropper(path):
            t = time.perf_counter()
            results = lm.loglikelihood(requests, disable_tqdm=True)
            dt = time.perf_counter() - t
        lps = [r[0] for r in results]
        picks = [max(range(4), key=lambda i, q=q: lps[4 * q + i]) for q in range(len(qs))]
        out["score"] = {
            "questions": len(qs),
            "seconds": dt,
            "batch_size": batch_size,
            "picks": picks,
            "logprobs": [lps[4 * q : 4 * q + 4] for q in range(len(qs))],
        }
        out["accelerate_score_questions_per_s"] = len(qs) / dt
        print(f"  {len(qs) / dt:.3f} questions/s (batch size {batch_size})", flush=True)
    out["peak_rss_bytes"] = peak_rss()
    return out


# -- the pipeline: 3 torchrun ranks, each streaming a third ----------------------------------------------------

PIPE_RANKS = 3
PIPE_SLOTS = 2  # per rank: three ranks read the one disk at once


def phase_pipeline_rank(path: Path, out_dir: Path, steps: int) -> None:
    """One torchrun rank: layers [lo, hi) of the big model streamed from the shards (rank 0 also holds the
    embeddings, the last rank the head), served with llm_model_parts.pipeline. Rank 0 decodes the tokens of
    the one-process run (`feed.json`) and records its logits at that run's top ids: random bf16 weights give
    near-tied logits, and a different thread count per rank may flip a greedy choice that logits within
    bf16's rounding do not show as a difference."""
    import bigmodel
    import torch
    import torch.distributed as dist

    from llm_model_parts.pipeline import (
        PipelineDriver,
        handshake,
        init_distributed,
        run_worker,
        stage_from_part,
    )

    torch.set_num_threads(1)  # three ranks on two cores
    own = init_distributed(device="cpu", timeout=900)
    rank, world = dist.get_rank(), dist.get_world_size()
    n = int(json.loads((path / "config.json").read_text())["num_hidden_layers"])
    cuts = [round(k * n / world) for k in range(world + 1)]
    part, off = bigmodel.stream_part(
        path,
        layers=(cuts[rank], cuts[rank + 1]),
        begin=rank == 0,
        end=rank == world - 1,
        max_resident_bytes=PIPE_SLOTS * 560_000_000,
        prefetch_depth=PIPE_SLOTS - 1,
    )
    stage = stage_from_part(part, max_seq_len=64)
    res: dict[str, Any] = {"rank": rank, "spec": stage.info.spec}
    if rank == 0:
        infos = handshake(stage.info, 0, world, timeout=900)
        driver = PipelineDriver(stage, infos=infos, world=world, timeout=900, owns_group=own)
        feed = json.loads((out_dir / "feed.json").read_text())

        def at_top(logits: Any, i: int) -> list[float]:
            return logits[0, -1].float()[feed["top_ids"][i]].tolist()

        with torch.inference_mode():
            t = time.perf_counter()
            logits = driver(torch.tensor([PROMPT]))
            res["prefill_s"] = time.perf_counter() - t
            tokens, top, times = [int(logits[0, -1].argmax())], [at_top(logits, 0)], []
            for i in range(steps):
                t = time.perf_counter()
                logits = driver(torch.tensor([[feed["tokens"][i]]]))
                times.append(time.perf_counter() - t)
                tokens.append(int(logits[0, -1].argmax()))
                top.append(at_top(logits, i + 1))
        res.update(tokens=tokens, top_logits=top, step_s=times)
        driver.close()
    else:
        run_worker(stage, rank=rank, world=world, timeout=900, startup_timeout=900)
        if own and dist.is_initialized():
            dist.destroy_process_group()
    off.remove()
    res["peak_rss_bytes"] = peak_rss()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(res))


def run_pipeline(quick: bool, reference: dict[str, Any]) -> dict[str, Any]:
    """The pipeline fed the one-process run's tokens (`reference`: ours' batch-1 decode); its logits at that
    run's top ids must agree within bf16's rounding (`logits_match`)."""
    with tempfile.TemporaryDirectory() as d:
        feed = {"tokens": reference["tokens"][0][:-1], "top_ids": reference["top_ids"]}
        (Path(d) / "feed.json").write_text(json.dumps(feed))
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc-per-node={PIPE_RANKS}",
               __file__, "--phase", "pipeline-rank", "--out", d] + (["--quick"] if quick else [])  # fmt: skip
        t = time.perf_counter()
        subprocess.run(cmd, check=True, timeout=1200)
        ranks = [json.loads((Path(d) / f"rank{r}.json").read_text()) for r in range(PIPE_RANKS)]
    got, want = ranks[0]["top_logits"], reference["top_logits"][: len(ranks[0]["top_logits"])]
    diff = max(abs(a - b) for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True))
    scale = max(abs(v) for w in want for v in w)
    return {
        "ranks": ranks,
        "wall_s": time.perf_counter() - t,
        "slots_per_rank": PIPE_SLOTS,
        "logits_max_diff": diff,
        "logits_tolerance": LOGIT_RTOL * scale,
        "logits_match": diff <= LOGIT_RTOL * scale,
    }


def pipeline_results(pipe: dict[str, Any]) -> dict[str, Any]:
    return {
        "pipeline": pipe,
        "pipeline_peak_rss_bytes_per_rank": [x["peak_rss_bytes"] for x in pipe["ranks"]],
        "pipeline_logits_match": pipe["logits_match"],
    }


# -- llm_offload with nothing to stream -----------------------------------------------------------------------


def phase_resident(quick: bool) -> dict[str, Any]:
    import fixtures
    import torch

    from llm_model_parts import load_part
    from llm_offload import offload

    torch.set_num_threads(2)
    path = fixtures.real_checkpoint("smollm2")
    ids = torch.randint(0, 49152, (1, 256), generator=torch.Generator().manual_seed(0))
    plain = load_part(path, "f")
    part = load_part(path, "f")
    handle = offload(part.layers, [m.state_dict() for m in part.layers], "cpu", max_resident_bytes=1 << 40)
    assert handle.resident == list(range(len(part.layers)))
    rounds = 5 if quick else 11
    ratios, a_s, b_s = [], [], []
    with torch.inference_mode():
        plain(ids), part(ids)
        for _ in range(rounds):  # interleaved, ratio within each round: the machine's load drifts
            t = time.perf_counter()
            plain(ids)
            a = time.perf_counter() - t
            t = time.perf_counter()
            part(ids)
            b = time.perf_counter() - t
            a_s.append(a)
            b_s.append(b)
            ratios.append(b / a)
    handle.remove()
    return {
        "model": "SmolLM2-135M fp32, 256-token forward, all 30 layers resident under llm_offload",
        "plain_s": statistics.median(a_s),
        "offload_s": statistics.median(b_s),
        "ratio": statistics.median(ratios),
        "rounds": rounds,
    }


# -- driver ---------------------------------------------------------------------------------------------------


def child(phase: str, quick: bool, extra: list[str]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = (
        [sys.executable, __file__, "--phase", phase, "--out", str(out)]
        + (["--quick"] if quick else [])
        + extra
    )
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    res = json.loads(out.read_text())
    out.unlink()
    res["wall_s"] = time.perf_counter() - t
    return res


def plot(r: dict[str, Any]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return []
    limit = r["model_bytes"] / r["disk_read_bw"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ours = r["ours"]
    xs = [1, *sorted(int(b) for b in ours["batch"])]
    ys = [ours["decode_s_per_token"]] + [ours["batch"][str(b)]["s_per_step"] for b in xs[1:]]
    ax = axes[0]
    ax.plot(xs, ys, marker="o", label="llm_offload, one step (all sequences)")
    ax.plot(xs, [y / x for x, y in zip(xs, ys, strict=True)], marker="s", label="per token")
    ax.axhline(limit, color="r", ls="--", label=f"disk limit {limit:.1f} s")
    ax.axhline(r["accelerate_decode_s_per_token"], color="gray", ls=":", label="accelerate, batch 1")
    ax.set_xlabel("sequences decoded together")
    ax.set_ylabel("seconds")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[1]
    slots = sorted(int(k) for k in ours["budget"])
    gb = [s * ours["max_resident_bytes"] / SLOTS / 1e9 for s in slots]
    ax.plot(gb, [ours["budget"][str(s)] for s in slots], marker="o", label="llm_offload, batch 1")
    ax.axhline(limit, color="r", ls="--", label="disk limit")
    ax.set_xlabel("byte budget for streamed layers (GB)")
    ax.set_ylabel("seconds per token")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.suptitle(
        f"{r['model_bytes'] / 1e9:.1f} GB bf16 model (Qwen2.5-14B shapes), 2 CPU cores, {r['mem_total_bytes'] / 2**30:.0f} GiB RAM"
    )
    fig.tight_layout()
    IMG.mkdir(parents=True, exist_ok=True)
    out = IMG / "big_model.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [str(out.relative_to(ROOT))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--phase", choices=["ours", "accelerate", "resident", "pipeline-rank"])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--cpu-bytes", type=int, default=0)
    ap.add_argument("--skip-accelerate", action="store_true")
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--only-pipeline", action="store_true", help="update big.json with the pipeline figures")
    args = ap.parse_args()
    import bigmodel

    if args.phase:
        path = bigmodel.default_dir()
        if args.phase == "ours":
            res = phase_ours(path, args.quick)
        elif args.phase == "pipeline-rank":
            phase_pipeline_rank(path, args.out, 2 if args.quick else 4)
            return
        elif args.phase == "accelerate":
            res = phase_accelerate(path, args.quick, args.cpu_bytes)
        else:
            res = phase_resident(args.quick)
        args.out.write_text(json.dumps(res))
        return

    if args.only_pipeline:
        r = json.loads(RESULTS.read_text())
        if "top_ids" not in r["ours"]["decode"]:
            raise SystemExit(f"{RESULTS} has no top logits of the one-process run: run the whole bench first")
        r.update(pipeline_results(run_pipeline(args.quick, r["ours"]["decode"])))
        RESULTS.write_text(json.dumps(r, indent=2))
        print(json.dumps({k: r[k] for k in ("pipeline_peak_rss_bytes_per_rank", "pipeline_logits_match")}))
        return

    t_all = time.perf_counter()
    path, built = bigmodel.ensure()
    r: dict[str, Any] = {
        "model": f"{path.name}: Qwen2.5-14B shapes, bf16, HF sharded safetensors",
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "quick": args.quick,
        "fixture_build_s": built,
        "model_bytes": bigmodel.model_bytes(path),
        "mem_total_bytes": mem_total(),
        "threads": 2,
    }
    print(f"model {r['model_bytes'] / 1e9:.2f} GB, RAM {r['mem_total_bytes'] / 1e9:.2f} GB", flush=True)
    before = disk_read_bw(path)
    print(f"disk: {before['disk_read_bw'] / 1e9:.2f} GB/s (O_DIRECT, sequential)", flush=True)
    ours = child("ours", args.quick, [])
    after = disk_read_bw(path)  # again: other jobs share the disk; the faster read is the stricter limit
    print(f"disk: {after['disk_read_bw'] / 1e9:.2f} GB/s (O_DIRECT, sequential, after)", flush=True)
    r["disk_read_bw_runs"] = [before["disk_read_bw"], after["disk_read_bw"]]
    r.update(max(before, after, key=lambda d: d["disk_read_bw"]))
    parallel = disk_read_bw(path, readers=READERS)  # the same bytes with as many reads in flight as ours
    print(
        f"disk: {parallel['disk_read_bw'] / 1e9:.2f} GB/s (O_DIRECT, {READERS} reads in flight)", flush=True
    )
    r["disk_read_bw_parallel"] = parallel["disk_read_bw"]
    r["disk_read_parallel_readers"] = READERS
    r["ours"] = ours
    for k in ("decode_s_per_token", "batch_decode_s_per_step", "batch_decode_batch_size", "score_questions_per_s",
              "peak_rss_bytes", "bytes_read_per_pass"):  # fmt: skip
        r[k] = ours[k]
    r["score_questions"] = ours["score"]["questions"]
    r["peak_rss_bound_bytes"] = ours["resident_bytes"] + ours["max_resident_bytes"] + ACT_BUDGET + (1 << 30)
    if not args.skip_accelerate:
        cpu_bytes = ours["resident_bytes"] + ours["max_resident_bytes"]
        acc = child("accelerate", args.quick, ["--cpu-bytes", str(cpu_bytes)])
        r["accelerate"] = acc
        r["accelerate_decode_s_per_token"] = acc["accelerate_decode_s_per_token"]
        r["accelerate_score_questions_per_s"] = acc["accelerate_score_questions_per_s"]
        r["accelerate_peak_rss_bytes"] = acc["peak_rss_bytes"]
        same = sum(a == b for a, b in zip(ours["score"]["picks"], acc["score"]["picks"], strict=True))
        r["same_picks"] = same
        diffs = [abs(a - b) for qa, qb in zip(ours["score"]["logprobs"], acc["score"]["logprobs"], strict=True)
                 for a, b in zip(qa, qb, strict=True)]  # fmt: skip
        r["max_logprob_diff_vs_lm_eval"] = max(diffs)
    if not args.skip_pipeline:
        r.update(pipeline_results(run_pipeline(args.quick, ours["decode"])))
    r["resident_overhead"] = child("resident", args.quick, [])
    limit = r["model_bytes"] / r["disk_read_bw"]
    r["ratios"] = {
        "model_bytes_over_mem_total": r["model_bytes"] / r["mem_total_bytes"],
        "decode_over_disk_limit": r["decode_s_per_token"] / limit,
        "decode_over_disk_limit_parallel": r["decode_s_per_token"]
        / (r["model_bytes"] / r["disk_read_bw_parallel"]),
        "bytes_read_per_pass_over_model_bytes": r["bytes_read_per_pass"] / r["model_bytes"],
        "batch8_step_over_batch1_step": r["batch_decode_s_per_step"] / r["decode_s_per_token"],
        "peak_rss_over_bound": r["peak_rss_bytes"] / r["peak_rss_bound_bytes"],
        "resident_offload_over_plain": r["resident_overhead"]["ratio"],
    }
    if "accelerate" in r:
        r["ratios"]["decode_tokens_per_s_over_accelerate"] = (
            r["accelerate_decode_s_per_token"] / r["decode_s_per_token"]
        )
        r["ratios"]["questions_per_s_over_lm_eval"] = (
            r["score_questions_per_s"] / r["accelerate_score_questions_per_s"]
        )
    r["total_s"] = time.perf_counter() - t_all
    r["plots"] = plot(r)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(r, indent=2))
    print(json.dumps(r["ratios"], indent=2))
    print(f"total {r['total_s']:.0f} s; saved {RESULTS}")


if __name__ == "__main__":
    main()
