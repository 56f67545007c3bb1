"""The HTTP server's continuous batching and robustness, SmolLM2-135M on the CPU, over loopback.

`python tools/bench/bench_server.py [--quick]` starts `python -m llm_model_parts.serve --model DIR --http`
in its own process, then measures:
1. one client, requests back to back: tokens/s and time to first token (TTFT, streamed);
2. 8 clients at once, each sending requests back to back: aggregate tokens/s (target >= 3x one client) and
   every request's TTFT (target: <= 2x the one-client TTFT plus one prefill, the one-client TTFT itself);
3. a load loop: 200 requests, 16 at a time, a quarter malformed, some streaming clients that disconnect
   mid-stream: every valid answer must equal the greedy answer of a request alone, every invalid one must be
   a 4xx, the server must stay up, and its RSS (all ranks' summed) must come back to its idle level.
`--pipeline N`: the same against a pipeline of N processes on this host (torchrun's environment, the layers
split evenly, rank 0 serving). Prints a table; saves tools/bench/results/server.json (server_pipeline.json).
`--peer transformers`: our server (the documented command's defaults) against `transformers serve` (fp32,
the CPU; its serving extra is pip-installed here when missing), the same streamed greedy chat requests in
interleaved rounds: one client against it, 8 clients against its `--continuous-batching`; ratios, text
equality; saves tools/bench/results/server_peer.json.
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
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain why the sky is blue in simple words.",
    "List five facts about the planet Mars.",
    "Describe a good breakfast for a busy morning.",
    "What makes a city pleasant to live in?",
    "Give three tips for learning a new language.",
    "Tell me about the history of bicycles.",
    "Why do cats purr? Answer in a few sentences.",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _stream(url: str, prompt: str, max_tokens: int, peer: bool = False) -> dict[str, Any]:
    """One streamed chat request: TTFT, tokens (usage), the text. `peer`: a body `transformers serve`
    takes (it rejects `ignore_eos` and `stream_options`, and always sends the usage)."""
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    if not peer:
        body.update(ignore_eos=True, stream_options={"include_usage": True})
    t0 = time.perf_counter()
    ttft = None
    text, tokens = [], 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for c in chunk.get("choices", []):
                if c["delta"].get("content"):
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    text.append(c["delta"]["content"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"ttft": ttft, "tokens": tokens, "seconds": time.perf_counter() - t0, "text": "".join(text)}


def _clients(
    url: str, clients: int, per_client: int, max_tokens: int, stagger: float = 0.0, peer: bool = False
) -> dict[str, Any]:
    """`clients` closed-loop clients; client c starts `c * stagger` s late and asks for a few more tokens
    than client c - 1 (so that requests arrive while others decode, as continuous batching is for)."""

    def one(c: int) -> list[dict[str, Any]]:
        time.sleep(c * stagger)
        out = []
        for k in range(per_client):
            extra = (c % 4) * 2 if stagger else 0
            prompt = PROMPTS[(c + k) % len(PROMPTS)]
            out.append({**_stream(url, prompt, max_tokens + extra, peer), "prompt": prompt})
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        runs = [r for rs in pool.map(one, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    ttfts = [r["ttft"] for r in runs]
    return {
        "clients": clients,
        "requests": len(runs),
        "tokens": sum(r["tokens"] for r in runs),
        "wall_s": wall,
        "tokens_per_s": sum(r["tokens"] for r in runs) / wall,
        "ttft_mean_s": statistics.mean(ttfts),
        "ttft_max_s": max(ttfts),
        "ttft_first_wave_max_s": max(ttfts[i * per_client] for i in range(clients)),
        "texts": {r["prompt"]: r["text"] for r in runs},
    }


MALFORMED: list[tuple[str, Any]] = [
    ("bad json", b"{not json"),
    ("unknown field", {"messages": [{"role": "user", "content": "hi"}], "bogus": 1}),
    ("temperature < 0", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}),
    ("max_tokens too large", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}),
    ("no messages", {"messages": []}),
    ("content not a string", {"messages": [{"role": "user", "content": 5}]}),
    ("n too large", {"messages": [{"role": "user", "content": "hi"}], "n": 1000}),
    ("body not an object", [1, 2, 3]),
]


def _load(
    url: str, total: int, concurrency: int, expected: dict[str, str], max_tokens: int
) -> dict[str, Any]:
    counts = {
        "valid_ok": 0,
        "valid_wrong": 0,
        "invalid_4xx": 0,
        "invalid_other": 0,
        "disconnected": 0,
        "429": 0,
    }

    def one(i: int) -> str:
        if i % 4 == 3:  # a quarter malformed
            _name, body = MALFORMED[i % len(MALFORMED)]
            kw: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
            r = httpx.post(url + "/v1/chat/completions", timeout=60, **kw)
            return "invalid_4xx" if 400 <= r.status_code < 500 and "error" in r.json() else "invalid_other"
        prompt = PROMPTS[i % len(PROMPTS)]
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}
        if i % 8 == 1:  # a streaming client that goes away after two chunks
            with httpx.stream(
                "POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60
            ) as r:
                for n, _ in enumerate(r.iter_lines()):
                    if n >= 3:
                        break
            return "disconnected"
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
        if r.status_code == 429:
            return "429"
        ok = r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected[prompt]
        return "valid_ok" if ok else "valid_wrong"

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for outcome in pool.map(one, range(total)):
            counts[outcome] += 1
    counts["wall_s"] = time.perf_counter() - t0  # type: ignore[assignment]
    return counts


def _prefill_cost(model: str, threads: int) -> dict[str, float]:
    """In this process, before the server starts: ms to prefill one chat prompt of PROMPTS, the 8 of them as
    one left-padded group (last position's logits), and the 8 with their common prefix computed once."""
    import torch

    from llm_model_parts import load_part
    from llm_model_parts.forward_func import IncrementalForward
    from llm_sampler.tokenizer import load_tokenizer

    torch.set_num_threads(threads)
    tok = load_tokenizer(model)
    prompts = [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True))
        for p in PROMPTS
    ]
    f = IncrementalForward([load_part(model, "f")], max_seq_len=512, max_rows=8)

    def prefill(group: list[list[int]]) -> float:
        f.reset()
        for _ in group:
            f.add_row()
        width = max(len(p) for p in group)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        t0 = time.perf_counter()
        f(ids, attention_mask=mask, rows=slice(0, len(group)), logits_to_keep=1)
        return time.perf_counter() - t0

    def shared_prefill(group: list[list[int]]) -> float:
        """As the engine does: the common prefix once in row 0, copied, then the rests as one group."""
        n = 0
        while all(len(p) > n + 1 and p[n] == group[0][n] for p in group):
            n += 1
        f.reset()
        for _ in group:
            f.add_row()
        rests = [p[n:] for p in group]
        width = max(len(r) for r in rests)
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rests])
        mask = torch.tensor([[1] * n + [0] * (width - len(r)) + [1] * len(r) for r in rests])
        t0 = time.perf_counter()
        f(torch.tensor([group[0][:n]]), rows=slice(0, 1), logits_to_keep=1)
        for r in range(1, len(group)):
            f.copy_prefix(0, r, n)
        f(ids, attention_mask=mask, rows=slice(0, len(group)), logits_to_keep=1)
        return time.perf_counter() - t0

    prefill(prompts)  # warm-up
    one = statistics.median(prefill(prompts[i % 8 : i % 8 + 1]) for i in range(5))
    wave = statistics.median(prefill(prompts) for _ in range(3))
    shared = statistics.median(shared_prefill(prompts) for _ in range(3))
    return {
        "prefill_1_ms": one * 1e3,
        "prefill_8_ms": wave * 1e3,
        "prefill_8_over_1": wave / one,
        "prefill_8_shared_prefix_ms": shared * 1e3,
    }


def _start(args: argparse.Namespace, port: int, log: Any) -> list[subprocess.Popen[bytes]]:
    """The server: one process, or `args.pipeline` ranks with the layers split evenly (rank 0 serves)."""
    argv = [
        sys.executable,
        "-m",
        "llm_model_parts.serve",
        "--model",
        args.model,
        "--http",
        f"127.0.0.1:{port}",
    ]
    if not args.peer:  # against a peer: the documented command, its defaults
        argv += ["--max-seq-len", "512", "--max-rows", "8", "--max-queue", "64"]
    n = args.pipeline
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if n == 1:
        return [subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)]
    layers = json.loads((Path(args.model) / "config.json").read_text())["num_hidden_layers"]
    cuts = [round(layers * i / n) for i in range(n + 1)]
    plan = ",".join(f"{cuts[i]}-{cuts[i + 1]}" for i in range(n))
    plan = "b " + plan + " e"
    argv += ["--plan", plan, "--timeout", "120", "--micro-batches", "2"]
    master = _free_port()
    procs = []
    for rank in range(n):
        rank_env = dict(
            env, RANK=str(rank), WORLD_SIZE=str(n), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(master), GLOO_SOCKET_IFNAME="lo",
        )  # fmt: skip
        procs.append(
            subprocess.Popen(argv, env=rank_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )
    return procs


def _wait_up(url: str, procs: list[subprocess.Popen[bytes]], log_name: str) -> None:
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start; see {log_name}")
        time.sleep(0.5)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        p.wait(timeout=30)


def _ensure_peer() -> None:
    """`transformers serve` needs its `serving` extra (FastAPI ...): installed here, into the bench's own
    environment, when missing. Never a dependency of the packages."""
    try:
        import fastapi  # noqa: F401
    except ImportError:
        import transformers

        spec = f"transformers[serving]=={transformers.__version__}"
        subprocess.run([sys.executable, "-m", "pip", "install", spec], check=True)


def _start_peer(args: argparse.Namespace, port: int, log: Any, cb: bool) -> list[subprocess.Popen[bytes]]:
    """`transformers serve MODEL` in fp32 on the CPU, with `--continuous-batching` when `cb`."""
    argv = [
        sys.executable, "-c", "import sys; from transformers.cli.transformers import main; sys.exit(main())",
        "serve", args.model, "--dtype", "float32", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    argv += ["--continuous-batching"] if cb else []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    return [subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)]


def _against_peer(args: argparse.Namespace, ours: str, log: Any, cb: bool, work: Any) -> dict[str, Any]:
    """`work(url, peer)` against our server and the peer alternately, `args.rounds` rounds (the order
    swapped each round): each round's result from each, their ratios, and whether the texts are equal."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    procs = _start_peer(args, port, log, cb)
    try:
        _wait_up(url, procs, log.name)
        _stream(url, PROMPTS[0], 4, peer=True)  # warm-up
        rounds = []
        for r in range(args.rounds):
            got: dict[str, Any] = {}
            for side in ("ours", "peer") if r % 2 == 0 else ("peer", "ours"):
                got[side] = work(ours if side == "ours" else url, side == "peer")
            got["tokens_per_s_ratio"] = got["ours"]["tokens_per_s"] / got["peer"]["tokens_per_s"]
            got["ttft_ratio"] = got["ours"]["ttft_mean_s"] / got["peer"]["ttft_mean_s"]
            got["same_text"] = got["ours"]["texts"] == got["peer"]["texts"]
            rounds.append(got)
            print(
                f"  round {r}: tokens/s {got['ours']['tokens_per_s']:.1f} vs {got['peer']['tokens_per_s']:.1f} "
                f"({got['tokens_per_s_ratio']:.2f}x), TTFT {got['ours']['ttft_mean_s'] * 1e3:.0f} vs "
                f"{got['peer']['ttft_mean_s'] * 1e3:.0f} ms ({got['ttft_ratio']:.2f}x), same text {got['same_text']}",
                flush=True,
            )
        peer_rss = _rss(procs[0].pid)
    finally:
        _stop(procs)
    return {
        "peer": "transformers serve" + (" --continuous-batching" if cb else ""),
        "rounds": rounds,
        "tokens_per_s_ratio_median": statistics.median(r["tokens_per_s_ratio"] for r in rounds),
        "ttft_ratio_median": statistics.median(r["ttft_ratio"] for r in rounds),
        "same_text": all(r["same_text"] for r in rounds),
        "peer_rss_bytes": peer_rss,
    }


def _peer_main(args: argparse.Namespace) -> int:
    """`--peer transformers`: one client against `transformers serve`, 8 clients against its continuous
    batching, interleaved rounds of the same streamed greedy chat requests."""
    import transformers

    _ensure_peer()
    requests, max_tokens = (2, 16) if args.quick else (6, 32)
    port = _free_port()
    ours = f"http://127.0.0.1:{port}"
    log = open(args.out.with_suffix(".log"), "w")  # noqa: SIM115
    procs = _start(args, port, log)
    try:
        _wait_up(ours, procs, log.name)
        _stream(ours, PROMPTS[0], 4)  # warm-up
        print("1 client, against transformers serve:", flush=True)
        single = _against_peer(
            args, ours, log, False, lambda url, peer: _clients(url, 1, requests, max_tokens, peer=peer)
        )
        print("8 clients, against transformers serve --continuous-batching:", flush=True)
        eight = _against_peer(
            args, ours, log, True, lambda url, peer: _clients(url, 8, requests // 2, max_tokens, peer=peer)
        )
        ours_rss = _rss(procs[0].pid)
    finally:
        _stop(procs)
        log.close()
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python", "tools/bench/bench_server.py", *sys.argv[1:]]),
        "model": Path(args.model).name,
        "threads": args.threads,
        "max_tokens": max_tokens,
        "transformers": transformers.__version__,
        "single": single,
        "eight": eight,
        "ours_rss_bytes": ours_rss,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, r in (
        ("1 client vs transformers serve", single),
        ("8 clients vs --continuous-batching", eight),
    ):
        print(
            f"{name}: tokens/s {r['tokens_per_s_ratio_median']:.2f}x, TTFT {r['ttft_ratio_median']:.2f}x "
            f"(medians of {args.rounds} rounds), same text {r['same_text']}, "
            f"peer RSS {r['peer_rss_bytes'] / 2**30:.1f} GiB"
        )
    print(f"ours RSS {ours_rss / 2**30:.2f} GiB; saved {args.out}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    ap.add_argument("--model", default=None, help="default: the SmolLM2 fixture")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server process")
    ap.add_argument(
        "--pipeline",
        type=int,
        default=1,
        help="N > 1: a pipeline of N processes (torchrun's env), rank 0 serves",
    )
    ap.add_argument(
        "--out", type=Path, default=None, help="default: tools/bench/results/server[_pipeline].json"
    )
    ap.add_argument(
        "--peer",
        choices=["transformers"],
        default=None,
        help="compare with `transformers serve` (1 client) and its --continuous-batching (8 clients)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="--peer: interleaved rounds")
    args = ap.parse_args()
    if args.out is None:
        name = "server.json" if args.pipeline == 1 else "server_pipeline.json"
        args.out = ROOT / "tools/bench/results" / ("server_peer.json" if args.peer else name)
    if args.model is None:
        import fixtures

        args.model = str(fixtures.real_checkpoint("smollm2"))
    if args.peer:
        return _peer_main(args)
    per_client = 2 if args.quick else 3
    max_tokens = 16 if args.quick else 32
    load_total = 64 if args.quick else 200

    prefill = _prefill_cost(args.model, args.threads)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(args.out.with_suffix(".log"), "w")  # noqa: SIM115
    procs = _start(args, port, log)
    try:
        _wait_up(url, procs, log.name)
        _stream(url, PROMPTS[0], 4)  # warm-up
        single = _clients(url, 1, per_client * 2, max_tokens)
        many = _clients(url, 8, per_client, max_tokens)  # all at once: the first wave prefills together
        staggered = _clients(
            url, 8, per_client, max_tokens, stagger=single["wall_s"] / single["requests"] / 8
        )
        expected = {p: _stream(url, p, 8)["text"] for p in PROMPTS}  # alone, greedy, 8 tokens
        time.sleep(1)
        idle = sum(_rss(p.pid) for p in procs)
        load = _load(url, load_total, 16, expected, 8)
        up = httpx.get(url + "/health", timeout=10).status_code == 200
        time.sleep(2)
        after = sum(_rss(p.pid) for p in procs)
    finally:
        _stop(procs)
        log.close()
    ratio = many["tokens_per_s"] / single["tokens_per_s"]
    ttft_limit = 3 * single["ttft_mean_s"]  # 2x the one-client TTFT plus one prefill (the one-client TTFT)
    result = {
        "quick": args.quick,
        "model": Path(args.model).name,
        "pipeline": args.pipeline,
        "threads": args.threads,
        "max_tokens": max_tokens,
        "single": single,
        "eight": many,
        "eight_staggered": staggered,
        "throughput_ratio": ratio,
        "throughput_ratio_staggered": staggered["tokens_per_s"] / single["tokens_per_s"],
        "ttft_limit_s": ttft_limit,
        "ttft_max_over_limit": many["ttft_max_s"] / ttft_limit,
        "ttft_max_over_limit_staggered": staggered["ttft_max_s"] / ttft_limit,
        **prefill,
        # the least a simultaneous wave's last first token can take: the 8 prompts' prefill in one group
        "wave_prefill_over_limit": prefill["prefill_8_ms"] / 1e3 / ttft_limit,
        "load": load,
        "server_up_after_load": up,
        "rss_idle_bytes": idle,
        "rss_after_bytes": after,
        "rss_after_over_idle": after / idle if idle else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        ("1 client tokens/s", f"{single['tokens_per_s']:.1f}"),
        ("8 clients tokens/s", f"{many['tokens_per_s']:.1f}"),
        ("throughput ratio (target >= 3)", f"{ratio:.2f}x"),
        ("1 client TTFT mean", f"{single['ttft_mean_s'] * 1000:.0f} ms"),
        (
            "8 clients TTFT mean / max",
            f"{many['ttft_mean_s'] * 1000:.0f} / {many['ttft_max_s'] * 1000:.0f} ms",
        ),
        ("8 clients first-wave TTFT max", f"{many['ttft_first_wave_max_s'] * 1000:.0f} ms"),
        ("TTFT max / (2x single + prefill)", f"{result['ttft_max_over_limit']:.2f}"),
        (
            "in-process prefill: 1 prompt / 8 as one group",
            f"{prefill['prefill_1_ms']:.0f} / {prefill['prefill_8_ms']:.0f} ms "
            f"({prefill['prefill_8_over_1']:.1f}x; the 8 alone: {result['wave_prefill_over_limit']:.2f} of the limit)",
        ),
        ("in-process prefill: the 8, shared prefix once", f"{prefill['prefill_8_shared_prefix_ms']:.0f} ms"),
        ("staggered: tokens/s ratio", f"{result['throughput_ratio_staggered']:.2f}x"),
        (
            "staggered: TTFT mean / max",
            f"{staggered['ttft_mean_s'] * 1000:.0f} / {staggered['ttft_max_s'] * 1000:.0f} ms",
        ),
        ("staggered: TTFT max / (2x single + prefill)", f"{result['ttft_max_over_limit_staggered']:.2f}"),
        ("load: valid ok / wrong", f"{load['valid_ok']} / {load['valid_wrong']}"),
        ("load: invalid 4xx / other", f"{load['invalid_4xx']} / {load['invalid_other']}"),
        ("load: disconnected, 429", f"{load['disconnected']}, {load['429']}"),
        ("server up after load", str(up)),
        (
            "RSS after / idle",
            f"{after / 2**20:.0f} / {idle / 2**20:.0f} MiB ({result['rss_after_over_idle']:.3f}x)",
        ),
    ]
    width = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"{a:<{width}}  {b}")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
