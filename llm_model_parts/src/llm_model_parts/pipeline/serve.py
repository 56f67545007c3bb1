"""Launcher: `torchrun --nproc-per-node 3 -m llm_model_parts.serve --model DIR --plan auto --prompt "Hello"`.

With `--http HOST:PORT` it serves an OpenAI-compatible HTTP API instead (llm_sampler's server, the extra
`llm-sampler[server]`): `python -m llm_model_parts.serve --model DIR --http 127.0.0.1:8000` in one process
(continuous batching over the part's KV cache rows; `--offload BUDGET` streams the layers with llm_offload),
or the same flags under torchrun, where rank 0 serves the pipeline (continuous batching too: up to
`--max-rows` rows in one KV cache per rank, each request's rows joining and leaving between steps). See
docs/server.md.

Every rank loads its part of DIR (a sepweight or HF directory: only the files its spec needs); rank 0
tokenizes, generates through the pipeline and prints. Without --prompt / --prompts-file, rank 0 reads
prompts from standard input, one per line, until end of input. Sampling uses llm_sampler when it is
installed (temperature, top-k, top-p ...), else greedy decoding. See docs/pipeline.md.
"""

from __future__ import annotations

import _thread
import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from llm_model_parts.pipeline.driver import PipelineDriver
from llm_model_parts.pipeline.launch import start_pipeline
from llm_model_parts.pipeline.transport import PipelineError

logger = logging.getLogger("llm_model_parts.serve")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m llm_model_parts.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", required=True, help="sepweight or Hugging Face checkpoint directory (on every host)"
    )
    ap.add_argument("--plan", default="auto", help='"auto" or one spec per rank: "b 0-10,10-20,20-30 e"')
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument(
        "--device", default=None, help="default: cuda:LOCAL_RANK when CUDA is available, else cpu"
    )
    ap.add_argument(
        "--max-seq-len", type=int, default=2048, help="KV cache slots per row (prompt + new tokens)"
    )
    ap.add_argument("--batch-size", type=int, default=1, help="most prompts per batch (for --plan auto)")
    ap.add_argument(
        "--memory", default=None, help="this rank's budget for --plan auto (e.g. 20GiB); default: free memory"
    )
    ap.add_argument(
        "--micro-batches", type=int, default=1, help="split each batch's rows into this many micro-batches"
    )
    ap.add_argument(
        "--prefill-chunk", type=int, default=None, help="split prompts into chunks of this many tokens"
    )
    ap.add_argument(
        "--timeout", type=float, default=60.0, help="seconds a rank waits for a neighbour before failing"
    )
    ap.add_argument(
        "--startup-timeout", type=float, default=600.0, help="seconds to wait for every rank to load"
    )
    ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch); one-shot")
    ap.add_argument(
        "--prompts-file", type=Path, default=None, help="a file of prompts, one per line, run as a batch"
    )
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (needs llm_sampler when > 0)")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=None)
    http = ap.add_argument_group("HTTP server (--http; see docs/server.md)")
    http.add_argument(
        "--http", default=None, metavar="HOST:PORT", help="serve the OpenAI API here (e.g. 127.0.0.1:8000)"
    )
    http.add_argument(
        "--api-key",
        default=None,
        help="require `Authorization: Bearer KEY` (default: the env var LLM_SAMPLER_API_KEY; unset = open)",
    )
    http.add_argument(
        "--model-name", default=None, help="the model id /v1/models reports (default: DIR's name)"
    )
    http.add_argument("--max-rows", type=int, default=8, help="most sequences decoding at once (batch rows)")
    http.add_argument("--max-queue", type=int, default=64, help="most requests waiting; beyond it: 429")
    http.add_argument(
        "--max-tokens-limit", type=int, default=2048, help="the largest max_tokens a request may ask for"
    )
    http.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, help="the largest request body (413 above)"
    )
    http.add_argument(
        "--server-prefill-chunk", type=int, default=128, help="prompt tokens per row per engine step"
    )
    http.add_argument(
        "--admit-wait",
        type=float,
        default=0.01,
        metavar="SECONDS",
        help="an idle server admits requests once this long passes with no new one, so that requests "
        "arriving together prefill as one group (once requests have overlapped; a lone client's are "
        "admitted at once)",
    )
    http.add_argument(
        "--offload",
        default=None,
        metavar="BUDGET",
        help="one process only: stream the layers with llm_offload under this resident budget (e.g. 200MiB)",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    torchrun = "RANK" in os.environ and "MASTER_ADDR" in os.environ
    if args.http is not None and not torchrun:
        return _serve_one_process(args)
    if args.offload is not None:
        logger.error("--offload is for one process (without torchrun)")
        return 2
    if not torchrun:
        logger.error("start this module with torchrun (see docs/pipeline.md): RANK/MASTER_ADDR are not set")
        return 2
    try:
        driver = start_pipeline(
            args.model,
            args.plan,
            device=args.device,
            dtype=getattr(torch, args.dtype),
            max_seq_len=args.max_seq_len,
            # the planner reserves KV cache for the rows the server runs at once
            batch_size=max(args.batch_size, args.max_rows) if args.http is not None else args.batch_size,
            micro_batches=args.micro_batches,
            prefill_chunk=args.prefill_chunk,
            # generation needs only the last position's logits (1/T of the traffic back); the server asks
            # for every position (logits_to_keep=0) when a request wants the prompt's log-probabilities
            output="last",
            max_rows=args.max_rows,
            timeout=args.timeout,
            startup_timeout=args.startup_timeout,
            memory=args.memory,
        )
        if driver is None:
            return 0  # a worker rank, shut down by rank 0
        with driver:
            driver.on_failure = lambda e: (
                _thread.interrupt_main()
            )  # wake rank 0 even while it waits for input
            if args.http is not None:
                _serve_http(driver, args, max_seq_len=args.max_seq_len)
            else:
                _drive(driver, args)
        return 0
    except PipelineError as e:
        logger.error("%s", e)
        return 1
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 1


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--http must be HOST:PORT (e.g. 127.0.0.1:8000), got {value!r}")
    return host.strip("[]"), int(port)


def _serve_http(forward_func: Any, args: argparse.Namespace, *, max_seq_len: int | None) -> None:
    """Serve `forward_func` over HTTP until interrupted (llm_sampler's server)."""
    try:
        from llm_sampler.server import serve
        from llm_sampler.server.protocol import Limits
    except ImportError:
        raise RuntimeError("--http needs llm_sampler's server: pip install 'llm-sampler[server]'") from None
    from llm_sampler.tokenizer import load_tokenizer  # tokenizers + jinja2: no transformers at run time

    host, port = _host_port(args.http)
    tokenizer = load_tokenizer(args.model)
    logger.info("serving %s on http://%s:%d/v1", args.model, host, port)
    serve(
        forward_func,
        tokenizer,
        host=host,
        port=port,
        model_name=args.model_name or Path(args.model).name,
        api_key=args.api_key,
        max_rows=args.max_rows,
        max_queue=args.max_queue,
        prefill_chunk=args.server_prefill_chunk,
        admit_wait=args.admit_wait,
        max_seq_len=max_seq_len,
        max_body_bytes=args.max_body_bytes,
        limits=Limits(max_tokens=args.max_tokens_limit, max_n=args.max_rows),
    )


def _serve_one_process(args: argparse.Namespace) -> int:
    """`--http` without torchrun: the whole model in this process (optionally offloaded)."""
    from llm_model_parts.part import load_part

    try:
        host_port = _host_port(args.http)
    except ValueError as e:
        logger.error("%s", e)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    part = load_part(args.model, "f", device=device, dtype=getattr(torch, args.dtype))
    if args.offload is not None:
        try:
            from llm_offload import SepweightSource, offload
        except ImportError:
            logger.error("--offload needs llm_offload: pip install llm-offload")
            return 2
        budget = _bytes(args.offload)
        source = SepweightSource(args.model, layers=part.layer_indices)
        offloaded = offload(part.layers, source, device, max_resident_bytes=budget)
        logger.info(
            "offloaded %d layers under %d bytes: %s", len(part.layers), budget, type(offloaded).__name__
        )
    from llm_model_parts.forward_func import IncrementalForward

    forward = IncrementalForward([part], max_seq_len=args.max_seq_len, max_rows=args.max_rows)
    logger.info("one process on %s, http://%s:%d", device, *host_port)
    try:
        _serve_http(forward, args, max_seq_len=args.max_seq_len)
    except RuntimeError as e:
        logger.error("%s", e)
        return 2
    return 0


def _bytes(text: str) -> int:
    units = {
        "": 1,
        "b": 1,
        "kib": 1 << 10,
        "mib": 1 << 20,
        "gib": 1 << 30,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
    }
    t = text.strip().lower()
    num = t.rstrip("kmgib")
    unit = t[len(num) :]
    if unit not in units or not num:
        raise ValueError(f"a byte budget like 200MiB or 2GB, got {text!r}")
    return int(float(num) * units[unit])


def _drive(driver: PipelineDriver, args: argparse.Namespace) -> None:
    tokenizer = _tokenizer(Path(args.model))
    eos = _eos_ids(Path(args.model))
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        prompts += [line for line in args.prompts_file.read_text().splitlines() if line.strip()]
    if prompts:
        for text in _complete(driver, tokenizer, prompts, eos, args):
            sys.stdout.write(text + "\n")
        return
    if sys.stdin.isatty():
        sys.stdout.write("prompt (empty line or end of input to quit)> ")
        sys.stdout.flush()
    for line in sys.stdin:
        if driver.failure is not None:
            raise driver.failure
        if not line.strip():
            break
        sys.stdout.write(_complete(driver, tokenizer, [line.rstrip("\n")], eos, args)[0] + "\n")
        if sys.stdin.isatty():
            sys.stdout.write("> ")
        sys.stdout.flush()


def _complete(
    driver: PipelineDriver, tokenizer: Any, prompts: list[str], eos: list[int], args: argparse.Namespace
) -> list[str]:
    ids = [tokenizer.encode(p).ids for p in prompts]
    pad = eos[0] if eos else 0
    driver.reset()
    new = generate(
        driver,
        ids,
        args.max_new_tokens,
        eos=eos,
        pad=pad,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    return [p + tokenizer.decode(n) for p, n in zip(prompts, new, strict=True)]


def generate(
    driver: PipelineDriver,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    eos: list[int],
    pad: int = 0,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> list[list[int]]:
    """New tokens per prompt, through llm_sampler when installed, else greedy."""
    try:
        import llm_sampler
    except ImportError:
        if temperature > 0:
            raise RuntimeError(
                "sampling with --temperature > 0 needs llm_sampler: pip install llm-sampler"
            ) from None
        return _greedy(driver, prompts, max_new_tokens, eos=eos, pad=pad)
    gen = llm_sampler.generate(
        driver, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        eos_token_id=eos or None, pad_token_id=pad,
    )  # fmt: skip
    out = []
    for row in gen.new_tokens.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        out.append(row[:cut])
    return out


def _greedy(
    driver: PipelineDriver, prompts: list[list[int]], max_new_tokens: int, *, eos: list[int], pad: int
) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    logits = driver(ids, attention_mask=mask)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1)
        for r, t in enumerate(nxt.tolist()):
            done[r] = done[r] or t in eos
            if not done[r]:
                out[r].append(t)
        if all(done) or driver.seq_len >= driver.max_seq_len:
            break
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], 1)
        logits = driver(nxt[:, None], attention_mask=mask)
    return out


def _tokenizer(model: Path) -> Any:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise RuntimeError(
            "the launcher tokenizes prompts with the `tokenizers` package: pip install tokenizers"
        ) from None
    path = model / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the launcher needs the model's tokenizer.json beside its weights")
    return Tokenizer.from_file(str(path))


def _eos_ids(model: Path) -> list[int]:
    ids: list[int] = []
    for name in ("generation_config.json", "config.json", "manifest.json"):
        path = model / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        value = data.get(
            "eos_token_id", data.get("config", {}).get("eos_token_id") if name == "manifest.json" else None
        )
        if value is not None:
            ids = [value] if isinstance(value, int) else [int(v) for v in value]
            break
    return ids


if __name__ == "__main__":
    sys.exit(main())
