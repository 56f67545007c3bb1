"""Support for the pipeline tests: a toy stage model, a rank entry point, and a launcher with a hard wall clock.

The toy model is a small causal network with a cache that depends on the whole history (a masked running
mean per layer), so a wrong cache, mask, rewind or ordering changes its logits. Every rank builds the same
weights from a seed and keeps only its own sections, as a real part would.

Run as a script, it is one rank of a pipeline (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` in the
environment): `python pipeline_toy.py SCENARIO OUT_DIR SPECS [options]`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

HIDDEN, VOCAB, LAYERS = 16, 50, 6


class ToyForward:
    """Incremental forward over sections of the toy model; `on_call(n)` is a hook for fault tests."""

    def __init__(
        self, spec: str, *, seed: int = 0, max_seq_len: int = 64, dtype: torch.dtype = torch.float32
    ) -> None:
        from llm_sepweight import PartSpec

        self.spec = PartSpec.parse(spec).resolve(LAYERS)
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.randn(VOCAB, HIDDEN, generator=g).to(dtype)
        self.weights = [
            torch.randn(HIDDEN, HIDDEN, generator=g).to(dtype) / HIDDEN**0.5 for _ in range(LAYERS)
        ]
        self.max_seq_len = max_seq_len
        self.history: dict[int, torch.Tensor] = {}
        self.seq_len = 0
        self.calls = 0

    def __call__(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        hook = os.environ.get("TOY_FAULT")
        if hook:
            _fault(hook, self.calls)
        t = x.shape[1]
        if self.seq_len + t > self.max_seq_len:
            raise ValueError("toy cache overflow")
        h = self.embed[x] if self.spec.begin else x
        end = self.seq_len + t
        w = (
            attention_mask[:, :end].to(h.dtype)
            if attention_mask is not None
            else torch.ones(x.shape[0], end, dtype=h.dtype)
        )
        for i in self.spec.layers:
            past = self.history.get(i)
            past = past[:, : self.seq_len] if past is not None else h[:, :0]
            full = torch.cat([past, h], 1)
            self.history[i] = full
            mean = (full * w[..., None]).cumsum(1) / w.cumsum(1).clamp(min=1)[..., None]
            h = h + torch.tanh(mean[:, -t:] @ self.weights[i])
        self.seq_len = end
        return h @ self.embed.T if self.spec.end else h

    def reset(self) -> None:
        self.history.clear()
        self.seq_len = 0

    def rewind(self, n: int) -> None:
        self.seq_len -= n


def _fault(hook: str, calls: int) -> None:
    """TOY_FAULT="kind:RANK:CALL": at its CALL-th forward that rank is killed ("kill"), hangs in the call
    ("hang"), or finishes the call and is stopped (SIGSTOP) a second later ("stop")."""
    kind, rank, call = hook.split(":")
    if int(os.environ["RANK"]) == int(rank) and calls == int(call):
        print(f"FAULT {kind} at {time.time() + (1.0 if kind == 'stop' else 0.0)!r}", flush=True)
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "hang":
            time.sleep(3600)
        else:
            import threading

            threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGSTOP)).start()


def toy_stage(spec: str, *, dtype: torch.dtype = torch.float32, max_seq_len: int = 64) -> object:
    from llm_model_parts.pipeline import Stage, StageInfo
    from llm_sepweight import PartSpec

    p = PartSpec.parse(spec).resolve(LAYERS)
    info = StageInfo(
        spec=spec,
        begin=p.begin,
        layers=(p.layers[0], p.layers[-1] + 1) if p.layers else (0, 0),
        end=p.end,
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        vocab_size=VOCAB,
        dtype=str(dtype).removeprefix("torch."),
        device="cpu",
        max_seq_len=max_seq_len,
        architecture="toy",
    )
    return Stage(info, lambda: ToyForward(spec, dtype=dtype, max_seq_len=max_seq_len))


# --- what rank 0 does ----------------------------------------------------------------------------------------


def script(driver: object) -> dict[str, torch.Tensor]:
    """A fixed sequence of calls exercising masks, chunks, micro-batches, rewind and reset."""
    out: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :1] = 0
    out["prefill"] = driver(ids, attention_mask=mask)  # type: ignore[operator]
    seq = ids
    for step in range(4):
        nxt = out[f"step{step - 1}" if step else "prefill"][:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        out[f"step{step}"] = driver(nxt, attention_mask=mask)  # type: ignore[operator]
    driver.rewind(2)  # type: ignore[attr-defined]
    out["after_rewind"] = driver(seq[:, -2:], attention_mask=mask)  # type: ignore[operator]
    driver.reset()  # type: ignore[attr-defined]
    out["new_batch"] = driver(torch.randint(0, VOCAB, (5, 11), generator=g))  # type: ignore[operator]
    out["seq_len"] = torch.tensor(driver.seq_len)  # type: ignore[attr-defined]
    return out


def real_script(f: object, job: dict) -> dict[str, torch.Tensor]:
    """Greedy decoding with logits, llm_sampler.generate and llm_sampler.score through forward_func `f`."""
    import llm_sampler

    out: dict[str, torch.Tensor] = {}
    prompts = job["prompts"]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    logits = f(ids, attention_mask=mask)  # type: ignore[operator]
    out["prefill"] = logits
    for step in range(job["steps"]):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        logits = f(nxt, attention_mask=mask)  # type: ignore[operator]
        out[f"step{step}"] = logits
    f.reset()  # type: ignore[attr-defined]
    gen = llm_sampler.generate(f, prompts, job["steps"], temperature=0)
    out["generated"] = gen.sequences
    f.reset()  # type: ignore[attr-defined]
    scores = llm_sampler.score(f, job["context"], job["options"])
    out["scores"] = torch.tensor([o.loglikelihood for o in scores], dtype=torch.float64)
    return out


def rows_script(f: object, max_rows: int) -> dict[str, torch.Tensor]:
    """The rows protocol (continuous batching) as a server drives it: rows join alone or as a left-padded
    group while others decode, decode ragged, rewind, leave from the middle; `f` has `max_rows` rows."""
    out: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(2)

    def ids(b: int, t: int) -> torch.Tensor:
        return torch.randint(3, 200, (b, t), generator=g)

    call = f  # type: Any
    assert call.add_row() == 0
    p0 = ids(1, 9)
    out["prefill_a"] = call(p0[:, :5], rows=slice(0, 1), logits_to_keep=0)
    out["prefill_b"] = call(p0[:, 5:], rows=slice(0, 1), logits_to_keep=1)
    out["decode1"] = call(ids(1, 1), rows=slice(0, 1), logits_to_keep=1)
    assert (call.add_row(), call.add_row()) == (1, 2)  # a group joins while row 0 is 10 tokens in
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    out["group"] = call(ids(2, 7), attention_mask=mask, rows=slice(1, 3), logits_to_keep=0)
    out["decode2"] = call(ids(3, 1), rows=slice(0, 3), logits_to_keep=1)
    out["decode3"] = call(ids(3, 1), rows=slice(0, 3))  # the forward's own output setting
    out["subset"] = call(ids(2, 1), rows=slice(0, 2), logits_to_keep=0)  # row 2 waits
    call.rewind(1, row=0)
    assert call.add_row() == 3  # joins alone with a longer prompt while the others wait
    out["join"] = call(ids(1, 13), rows=slice(3, 4), logits_to_keep=0)
    out["decode4"] = call(ids(4, 1), rows=slice(0, 4), logits_to_keep=1)
    for _ in range(max_rows - 4):
        call.add_row()
    try:
        call.add_row()
        out["full"] = torch.tensor(0)
    except RuntimeError as e:  # the forward keeps working
        out["full"] = torch.tensor(int(f"all {max_rows} rows are in use" in str(e)))
    for r in range(max_rows - 1, 3, -1):
        call.remove_row(r)
    out["moved"] = torch.tensor(call.remove_row(1))  # the last row (3) moves into row 1
    out["decode5"] = call(ids(3, 1), rows=slice(0, 3), logits_to_keep=0)
    out["last_leaves"] = torch.tensor(-1 if call.remove_row(2) is None else 1)
    out["decode6"] = call(ids(2, 3), rows=slice(0, 2), logits_to_keep=0)  # several tokens, ragged
    call.rewind(2)  # every row
    out["decode7"] = call(ids(2, 1), rows=slice(0, 2), logits_to_keep=0)
    call.reset()  # back to a fixed batch
    out["fixed"] = call(ids(2, 5), logits_to_keep=0)
    call.reset()
    assert call.add_row() == 0
    out["rows_again"] = call(ids(1, 4), rows=slice(0, 1), logits_to_keep=0)
    return out


class KeepLogits:
    """`logits_to_keep` (0 = all, 1 = the last, None = the last, as the launcher's output="last") over a
    forward_func without it, for the reference side of rows_script."""

    def __init__(self, f: Any) -> None:
        self.f = f

    def __call__(self, new_ids: torch.Tensor, logits_to_keep: int | None = None, **kw: Any) -> torch.Tensor:
        out: torch.Tensor = self.f(new_ids, **kw)
        return out if logits_to_keep == 0 else out[:, -1:]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


def _rows_rank(args: argparse.Namespace, rank: int, world: int, specs: list[str]) -> None:
    """One rank of a real-model pipeline running rows_script; ROWS_CAP="RANK:N" makes that rank's stage
    hold at most N rows (a rank that cannot add a row)."""
    from safetensors.torch import save_file

    from llm_model_parts.pipeline import PipelineDriver, init_distributed, load_stage, run_worker

    job = json.loads((args.out / "job.json").read_text())
    init_distributed(device="cpu", timeout=args.timeout)
    stage = load_stage(
        job["model"],
        specs[rank],
        device=torch.device("cpu"),
        dtype=torch.float32,
        max_seq_len=job["max_seq_len"],
    )
    cap = os.environ.get("ROWS_CAP")
    if cap and int(cap.split(":")[0]) == rank:
        new_rows = stage.new_rows
        assert new_rows is not None
        stage.new_rows = lambda _n: new_rows(int(cap.split(":")[1]))
    try:
        if rank > 0:
            run_worker(stage, timeout=args.timeout)
            return
        driver = PipelineDriver(
            stage, world=world, micro_batches=args.micro_batches, prefill_chunk=args.prefill_chunk,
            output="last", max_rows=job["max_rows"], timeout=args.timeout,
        )  # fmt: skip
        with driver:
            out = rows_script(driver, job["max_rows"])
        save_file({k: v.contiguous() for k, v in out.items()}, str(args.out / "rank0.safetensors"))
    finally:
        torch.distributed.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=["script", "loop", "idle", "real", "rows"])
    ap.add_argument("out", type=Path)
    ap.add_argument("specs")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--micro-batches", type=int, default=1)
    ap.add_argument("--prefill-chunk", type=int, default=None)
    ap.add_argument("--dtypes", default="")
    args = ap.parse_args()
    from safetensors.torch import save_file

    from llm_model_parts.pipeline import PipelineDriver, run_worker, start_pipeline

    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    specs = args.specs.split(",")
    if args.scenario == "rows":
        _rows_rank(args, rank, world, specs)
        return
    if args.scenario == "real":
        job = json.loads((args.out / "job.json").read_text())
        driver = start_pipeline(
            job["model"], specs, device="cpu", dtype=torch.float32, max_seq_len=job["max_seq_len"],
            micro_batches=args.micro_batches, prefill_chunk=args.prefill_chunk, timeout=args.timeout,
        )  # fmt: skip
        if driver is not None:
            with driver:
                out = real_script(driver, job)
            save_file({k: v.contiguous() for k, v in out.items()}, str(args.out / "rank0.safetensors"))
        return
    dtypes = args.dtypes.split(",") if args.dtypes else ["float32"] * world
    if world > 1:
        from llm_model_parts.pipeline import init_distributed

        init_distributed(device="cpu", timeout=args.timeout)
    stage = toy_stage(specs[rank], dtype=getattr(torch, dtypes[rank]))
    try:
        if rank > 0:
            run_worker(stage, timeout=args.timeout)  # type: ignore[arg-type]
            return
        driver = PipelineDriver(
            stage,  # type: ignore[arg-type]
            world=world,
            micro_batches=args.micro_batches,
            prefill_chunk=args.prefill_chunk,
            timeout=args.timeout,
        )
        if args.scenario == "script":
            out = script(driver)
            save_file({k: v.contiguous() for k, v in out.items()}, str(args.out / "rank0.safetensors"))
        elif args.scenario == "loop":
            ids = torch.randint(0, VOCAB, (2, 4))
            while True:
                driver.reset()
                for _ in range(10):
                    ids = driver(ids)[:, -1:].argmax(-1)
        elif args.scenario == "idle":
            driver(torch.randint(0, VOCAB, (2, 4)))
            deadline = time.monotonic() + 10 * args.timeout
            while driver.failure is None and time.monotonic() < deadline:
                time.sleep(0.1)
            driver(torch.randint(0, VOCAB, (2, 1)))  # raises the heartbeat's error
        driver.close()
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


# --- the launcher the tests use --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RankResult:
    rank: int
    returncode: int | None  # None: killed by the launcher's wall clock
    output: str
    seconds: float  # from launch to exit
    ended_at: float  # time.time() at exit (inf: still running at the wall clock)

    @property
    def fault_at(self) -> float:
        """When the fault hook fired in this rank (time.time()), from its output."""
        for line in self.output.splitlines():
            if line.startswith("FAULT "):
                return float(line.split(" at ")[1])
        raise AssertionError(f"rank {self.rank} never reached its fault:\n{self.output[-3000:]}")


def launch(
    argv_for_rank: list[list[str]], *, wall: float, env: dict[str, str] | None = None, hung: int | None = None
) -> list[RankResult]:
    """Start one process per rank on localhost; kill everything left after `wall` seconds, or as soon as
    every rank but `hung` (one made to hang) has exited."""
    world = len(argv_for_rank)
    port = free_port()
    procs = []
    logs = []
    start = time.monotonic()
    for rank, argv in enumerate(argv_for_rank):
        e = dict(os.environ)
        e.update(env or {})
        e.update(
            RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
        )  # fmt: skip
        log = tempfile.TemporaryFile("w+")  # noqa: SIM115
        logs.append(log)
        procs.append(
            subprocess.Popen(argv, env=e, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )
    ended: dict[int, float] = {}
    ended_at: dict[int, float] = {}
    try:
        need = world - (hung is not None)
        while len(set(ended) - {hung}) < need and time.monotonic() - start < wall:
            for r, p in enumerate(procs):
                if r not in ended and p.poll() is not None:
                    ended[r] = time.monotonic() - start
                    ended_at[r] = time.time()
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            p.wait()
    results = []
    for r, (p, log) in enumerate(zip(procs, logs, strict=True)):
        log.seek(0)
        results.append(
            RankResult(
                r,
                p.returncode if r in ended else None,
                log.read(),
                ended.get(r, float("inf")),
                ended_at.get(r, float("inf")),
            )
        )
        log.close()
    return results


def toy_argv(scenario: str, out: Path, specs: str, *extra: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), scenario, str(out), specs, *extra]


if __name__ == "__main__":
    main()
