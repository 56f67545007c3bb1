"""llm_model_parts against transformers, side by side in one process (SmolLM2-135M-Instruct and
Gemma-3-270M, fp32, CPU), every measurement in interleaved rounds (ours, then transformers), medians:

- greedy decode of N tokens, batch 1: our Part's incremental forward_func (preallocated KV cache)
  against transformers' `generate` (same tokens required); the same for a `deepcopy` of the part and
  for a part saved to safetensors and loaded back (they must keep the speed);
- the decode step compiled (`llm_model_parts.compiled.CompiledDecoder`, torch.compile fullgraph) beside
  it (SmolLM2 only unless --compile names more);
- prefill of 32 and of 256 tokens: our Part's forward against transformers' forward;
- batched greedy decode of 2-16 rows: llm_sampler's `generate` over the Part against transformers'
  `generate` with the same batch (same tokens required);
- the bandwidth bound for decode: bytes of weights read per token / measured memory read bandwidth;
- peak RSS of `load_part(path, "0-10")` against `load_part(path, "f")`, each in a fresh subprocess.

One table, a column per model; JSON (with the date and the command) in tools/bench/results/parts.json.
Run it alone on the machine (`flock -x /tmp/bench.lock python tools/bench/bench_parts.py`).

    python tools/bench/bench_parts.py                    # full run, both models
    python tools/bench/bench_parts.py --quick            # smoke run
    python tools/bench/bench_parts.py --models smollm2   # one model
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import fixtures  # noqa: E402

from llm_model_parts import load_part  # noqa: E402

RSS_SCRIPT = """
import sys, torch
from llm_model_parts import load_part

def peak():  # VmHWM: this process's peak RSS (ru_maxrss can carry the forking parent's over exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

before = peak()
part = load_part(sys.argv[1], sys.argv[2])
with torch.inference_mode():  # weights may be memory-mapped: touch every page the part uses
    part(torch.ones(1, 4, dtype=torch.long) if part.spec.begin else torch.ones(1, 4, part.config.hidden_size))
after = peak()
params = sum(p.numel() * p.element_size() for p in {id(p): p for p in part.parameters()}.values())
print(before, after, params)
"""


def peak_rss(path: Path, spec: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(path), spec], capture_output=True, text=True, check=True
    )
    before, after, params = (int(x) for x in out.stdout.split())
    return {"peak_rss_mb": after / 1e6, "load_delta_mb": (after - before) / 1e6, "param_mb": params / 1e6}


def read_bandwidth(nbytes: int = 1 << 29, repeats: int = 7) -> float:
    """Bytes/s of a streaming read (sum over a buffer much larger than the caches)."""
    x = torch.ones(nbytes // 4)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times)


def greedy_ours(ff, ids: torch.Tensor, n: int) -> tuple[list[int], float]:
    ff.reset()
    t0 = time.perf_counter()
    logits = ff(ids)
    tokens = []
    for _ in range(n):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        logits = ff(nxt)
    return torch.cat(tokens, 1)[0].tolist(), time.perf_counter() - t0


def hf_generate(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """n greedy new tokens per row from transformers' `generate` (eos forbidden until n)."""
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
    )
    return out[:, ids.shape[1] :]


def greedy_hf(model, ids: torch.Tensor, n: int) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    out = hf_generate(model, ids, n)
    return out[0].tolist(), time.perf_counter() - t0


def saved_and_reloaded(part, path: Path):
    """The part written with safetensors under HF's names and loaded into a fresh part."""
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "part.safetensors"
        save_file({k: v.clone() for k, v in part.state_dict().items()}, file)
        fresh = load_part(path, "f")
        fresh.load_state_dict(load_file(file))
    return fresh


def greedy_compiled(part, ids: torch.Tensor, n: int, decoder=None, capacity: int = 0):
    """Prefill eagerly, then n - 1 compiled decode steps; -> tokens, seconds, the decoder (reuse it)."""
    from llm_model_parts.compiled import CompiledDecoder

    if decoder is None:
        decoder = CompiledDecoder(part, part.new_cache(1, max(capacity, ids.shape[1] + n + 8)))
    decoder.cache.reset()
    t0 = time.perf_counter()
    tok = part(ids, decoder.cache)[:, -1:].argmax(-1)
    tokens = [int(tok)]
    for _ in range(n - 1):
        tok = decoder(tok)[:, -1:].argmax(-1)
        tokens.append(int(tok))
    return tokens, time.perf_counter() - t0, decoder


def greedy_batched(ff, hf, ids: torch.Tensor, n: int) -> tuple[torch.Tensor, float, torch.Tensor, float]:
    """n greedy tokens for every row of `ids` through llm_sampler's `generate` and transformers' `generate`
    (eos forbidden until n in both, so that every row runs n steps) -> our tokens, seconds, theirs, seconds."""
    from llm_sampler import generate

    eos = hf.generation_config.eos_token_id
    t0 = time.perf_counter()
    ours = generate(ff, ids, n, temperature=0, eos_token_id=eos, min_new_tokens=n).new_tokens
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = hf_generate(hf, ids, n)
    return ours, t_ours, theirs, time.perf_counter() - t0


def chat_prompt(path: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    request = "Write a short story about a lighthouse keeper who finds a message in a bottle."
    if tok.chat_template:
        chat = [{"role": "user", "content": request}]
        prompt: Any = tok.apply_chat_template(
            chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return prompt["input_ids"]
    return tok(request, return_tensors="pt")["input_ids"]  # the Gemma-3 fixture's tokenizer has no template


def bench_model(model: str, args: argparse.Namespace) -> dict:
    """Every measurement for one checkpoint, ours and transformers' interleaved round by round."""
    from transformers import AutoModelForCausalLM

    new_tokens, prefill_len, repeats = (16, 64, 1) if args.quick else (64, 256, args.repeats)
    batch_rows = [int(r) for r in args.rows.split(",") if r]
    batch_tokens = 8 if args.quick else args.batch_tokens
    compiled = model in args.compile.split(",")
    path = fixtures.real_checkpoint(model)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    part = load_part(path, "f")
    ff = part.as_forward_func()
    ff_copy = copy.deepcopy(part).as_forward_func()
    ff_saved = saved_and_reloaded(part, path).as_forward_func()
    prompt = chat_prompt(path)
    prefill_ids = torch.randint(3, hf.config.vocab_size, (1, prefill_len))
    prefill_short = prefill_ids[:, :32]
    batch_ids = {b: torch.randint(3, hf.config.vocab_size, (b, 32)) for b in batch_rows}

    ratios: dict[str, list[float]] = {
        k: [] for k in ("decode", "copy", "saved", "compiled", "prefill", "prefill32")
    }
    batch_ratios: dict[int, list[float]] = {b: [] for b in batch_rows}
    batch_runs: list[dict] = []
    rows = []
    same_tokens = same_batched = True
    decoder = None
    compile_s = 0.0
    with torch.inference_mode():
        greedy_ours(ff, prompt, 4)  # warm-up all
        greedy_ours(ff_copy, prompt, 4)
        greedy_ours(ff_saved, prompt, 4)
        greedy_hf(hf, prompt, 4)
        if compiled:
            t0 = time.perf_counter()
            _, _, decoder = greedy_compiled(part, prompt, 4, capacity=prompt.shape[1] + new_tokens + 8)
            compile_s = time.perf_counter() - t0
        for b in batch_rows:
            greedy_batched(ff, hf, batch_ids[b], 2)
        hf(prefill_ids)
        ff.reset()
        ff(prefill_ids)
        for r in range(repeats):
            ours_tokens, t_ours = greedy_ours(ff, prompt, new_tokens)
            hf_tokens, t_hf = greedy_hf(hf, prompt, new_tokens)
            copy_tokens, t_copy = greedy_ours(ff_copy, prompt, new_tokens)
            saved_tokens, t_saved = greedy_ours(ff_saved, prompt, new_tokens)
            same_tokens &= ours_tokens == hf_tokens == copy_tokens == saved_tokens
            t_compiled = float("nan")
            if compiled:
                compiled_tokens, t_compiled, decoder = greedy_compiled(part, prompt, new_tokens, decoder)
                same_tokens &= compiled_tokens == hf_tokens
                ratios["compiled"].append(t_hf / t_compiled)
            prefill = {}
            for label, ids in (("prefill", prefill_ids), ("prefill32", prefill_short)):
                t0 = time.perf_counter()
                hf(ids)
                t_hf_prefill = time.perf_counter() - t0
                ff.reset()
                t0 = time.perf_counter()
                ff(ids)  # writes the KV cache, as transformers' forward fills its DynamicCache
                prefill[label] = (time.perf_counter() - t0, t_hf_prefill)
                ratios[label].append(prefill[label][0] / t_hf_prefill)
            ratios["decode"].append(t_hf / t_ours)
            ratios["copy"].append(t_hf / t_copy)
            ratios["saved"].append(t_hf / t_saved)
            rows.append(
                {
                    "ours_tok_s": new_tokens / t_ours,
                    "deepcopy_tok_s": new_tokens / t_copy,
                    "saved_reloaded_tok_s": new_tokens / t_saved,
                    "compiled_tok_s": new_tokens / t_compiled,
                    "hf_tok_s": new_tokens / t_hf,
                    "ours_prefill_s": prefill["prefill"][0],
                    "hf_prefill_s": prefill["prefill"][1],
                    "ours_prefill32_s": prefill["prefill32"][0],
                    "hf_prefill32_s": prefill["prefill32"][1],
                }
            )
            batched = []
            for b in batch_rows:
                ours_b, t_ours_b, hf_b, t_hf_b = greedy_batched(ff, hf, batch_ids[b], batch_tokens)
                same_batched &= torch.equal(ours_b, hf_b)
                batch_ratios[b].append(t_hf_b / t_ours_b)
                tokens = b * batch_tokens
                batch_runs.append(
                    {"round": r, "rows": b, "ours_tok_s": tokens / t_ours_b, "hf_tok_s": tokens / t_hf_b}
                )
                batched.append(f"{b}: {tokens / t_ours_b:.0f}/{tokens / t_hf_b:.0f}")
            print(
                f"{model} round {r}: decode tok/s ours {new_tokens / t_ours:6.2f} (deepcopy {new_tokens / t_copy:6.2f}, "
                f"saved+reloaded {new_tokens / t_saved:6.2f}, compiled {new_tokens / t_compiled:6.2f}), "
                f"transformers {new_tokens / t_hf:6.2f}; prefill {prefill_len}: ours {prefill['prefill'][0]:.3f} s, "
                f"transformers {prefill['prefill'][1]:.3f} s; prefill 32: ours {prefill['prefill32'][0]:.4f} s, "
                f"transformers {prefill['prefill32'][1]:.4f} s; batched tok/s ours/transformers {', '.join(batched)}",
                flush=True,
            )
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in part.parameters()}.values())
    bandwidth = read_bandwidth()
    bound = bandwidth / weight_bytes
    ours_tok_s = statistics.median(r["ours_tok_s"] for r in rows)
    median = {k: statistics.median(v) if v else float("nan") for k, v in ratios.items()}
    result = {
        "model": {"smollm2": "SmolLM2-135M-Instruct", "gemma3": "Gemma-3-270M"}[model] + " fp32 CPU",
        "new_tokens": new_tokens,
        "prefill_tokens": prefill_len,
        "batch_new_tokens": batch_tokens,
        "same_greedy_tokens": same_tokens,
        "same_batched_tokens": same_batched,
        "decode_speedup_median": median["decode"],
        "decode_speedup_deepcopy_median": median["copy"],
        "decode_speedup_saved_reloaded_median": median["saved"],
        "decode_speedup_compiled_median": median["compiled"],
        "compile_s": compile_s,
        "prefill_time_ratio_median": median["prefill"],
        "prefill32_time_ratio_median": median["prefill32"],
        "batched_decode_speedup_median": {str(b): statistics.median(v) for b, v in batch_ratios.items()},
        "runs": rows,
        "batched_runs": batch_runs,
        "weight_bytes_per_token": weight_bytes,
        "read_bandwidth_gb_s": bandwidth / 1e9,
        "bandwidth_bound_tok_s": bound,
        "ours_fraction_of_bound": ours_tok_s / bound,
        "peak_rss": {} if args.quick else {spec: peak_rss(path, spec) for spec in ("0-10", "f")},
    }
    # Best of N (as timeit reports): on a shared machine the fastest run of each is the one least
    # disturbed by other work, so the ratio of the best times is the quiet machine's ratio.
    result["best_of_runs"] = {
        "decode": max(r["ours_tok_s"] for r in rows) / max(r["hf_tok_s"] for r in rows),
        "prefill": min(r["ours_prefill_s"] for r in rows) / min(r["hf_prefill_s"] for r in rows),
        "prefill32": min(r["ours_prefill32_s"] for r in rows) / min(r["hf_prefill32_s"] for r in rows),
    }
    return result


def profile_decode(model: str, steps: int = 48) -> dict:
    """Per-operator time of one greedy decode step (batch 1), ours and transformers' (its forward with a
    DynamicCache, the loop `generate` runs), torch.profiler, ms per token by the weight each matmul reads."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM, DynamicCache

    path = fixtures.real_checkpoint(model)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    part = load_part(path, "f")
    ff = part.as_forward_func()
    config = part.config
    ids = torch.randint(3, config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    # weight (out, in) as each kernel sees it -> what it is; transformers' mm gets W.T
    kinds = {(q + 2 * kv, hidden): "q/k/v_proj", (kv, hidden): "q/k/v_proj", (q, hidden): "q_proj",
             (hidden, q): "o_proj", (2 * inter, hidden): "gate/up_proj", (inter, hidden): "gate/up_proj",
             (hidden, inter): "down_proj", (vocab, hidden): "lm_head"}  # fmt: skip

    def kind(name: str, shapes: list) -> str | None:
        if "scaled_dot_product" in name:
            return "attention (SDPA)"
        if name in ("mkldnn::_linear_pointwise", "aten::addmv_", "aten::mv"):
            return kinds.get(tuple(shapes[1]))
        if name == "aten::mm":
            return kinds.get(tuple(reversed(shapes[1])))
        return None

    def ours_step() -> Callable[[], None]:
        ff.reset()
        nxt = ff(ids)[:, -1:].argmax(-1)

        def step() -> None:
            nonlocal nxt
            nxt = ff(nxt)[:, -1:].argmax(-1)

        return step

    def hf_step() -> Callable[[], None]:
        cache = DynamicCache(config=hf.config)
        nxt = hf(ids, past_key_values=cache).logits[:, -1:].argmax(-1)
        pos = ids.shape[1]

        def step() -> None:
            nonlocal nxt, pos
            out = hf(nxt, past_key_values=cache, position_ids=torch.tensor([[pos]]))
            nxt, pos = out.logits[:, -1:].argmax(-1), pos + 1

        return step

    table: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for who, make in (("ours", ours_step), ("transformers", hf_step)):
            step = make()
            for _ in range(4):
                step()
            step = make()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            unprofiled = (time.perf_counter() - t0) / steps * 1e3
            step = make()
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(steps):
                    step()
            events = prof.key_averages(group_by_input_shape=True)
            total = sum(e.self_cpu_time_total for e in events) / steps / 1e3
            ms: dict[str, float] = {}
            for e in events:
                k = kind(e.key, e.input_shapes)
                if k is not None:
                    ms[k] = ms.get(k, 0.0) + e.self_cpu_time_total / steps / 1e3
            if who == "transformers" and q == hidden:  # its q_proj and o_proj have one shape: half each
                ms["o_proj"] /= 2
                ms["q/k/v_proj"] += ms["o_proj"]
            ms["q/k/v_proj"] = ms.get("q/k/v_proj", 0.0) + ms.pop("q_proj", 0.0)
            ms["everything else (norms, RoPE, cache, sampling, Python)"] = total - sum(ms.values())
            ms["profiled step"] = total
            ms["unprofiled step"] = unprofiled
            for k, t in ms.items():
                table.setdefault(k, {})[who] = t
    print(f"\n{model}: decode step, ms per token (torch.profiler self CPU time, {steps} steps)")
    print(f"{'operator':56s} {'ours':>8s} {'transformers':>13s}")
    for k, row in table.items():
        print(f"{k:56s} {row.get('ours', 0.0):8.2f} {row.get('transformers', 0.0):13.2f}")
    return table


def print_table(results: dict[str, dict]) -> None:
    names = list(results)
    print()
    print(
        f"{'median of interleaved rounds':44s} " + " ".join(f"{n:>10s}" for n in names) + "  target (SmolLM2)"
    )

    def line(label: str, values: list[float], target: str = "", fmt: str = "10.3f") -> None:
        print(f"{label:44s} " + " ".join(f"{v:{fmt}}" for v in values) + (f"  {target}" if target else ""))

    first = results[names[0]]
    line("decode tok/s ours / transformers", [r["decode_speedup_median"] for r in results.values()], ">= 1.3")
    line("  best of rounds", [r["best_of_runs"]["decode"] for r in results.values()])
    line("  a deepcopy of the part", [r["decode_speedup_deepcopy_median"] for r in results.values()])
    line(
        "  saved to safetensors and reloaded",
        [r["decode_speedup_saved_reloaded_median"] for r in results.values()],
    )
    line("  compiled decode step", [r["decode_speedup_compiled_median"] for r in results.values()])
    line("  (compile time, s)", [r["compile_s"] for r in results.values()], fmt="10.1f")
    line(
        f"prefill {first['prefill_tokens']} time ours / transformers",
        [r["prefill_time_ratio_median"] for r in results.values()],
        "<= 1.0",
    )
    line(
        "prefill 32 time ours / transformers",
        [r["prefill32_time_ratio_median"] for r in results.values()],
        "<= 1.0",
    )
    for b in first["batched_decode_speedup_median"]:
        line(
            f"batched decode {b} rows tok/s ours / transformers",
            [r["batched_decode_speedup_median"][b] for r in results.values()],
            ">= 1.2",
        )
    print(
        f"{'same greedy tokens (batch 1; batched)':44s} "
        + " ".join(
            f"{str(r['same_greedy_tokens'])[0]}; {str(r['same_batched_tokens'])[0]}".rjust(10)
            for r in results.values()
        )
    )
    line(
        "ours decode tok/s",
        [statistics.median(x["ours_tok_s"] for x in r["runs"]) for r in results.values()],
        fmt="10.2f",
    )
    line(
        "transformers decode tok/s",
        [statistics.median(x["hf_tok_s"] for x in r["runs"]) for r in results.values()],
        fmt="10.2f",
    )
    line(
        "bandwidth bound tok/s (weights / read GB/s)",
        [r["bandwidth_bound_tok_s"] for r in results.values()],
        fmt="10.2f",
    )
    line("ours tok/s / bound", [r["ours_fraction_of_bound"] for r in results.values()])
    for spec in first["peak_rss"]:
        line(
            f"peak RSS load_part {spec!r} MB",
            [r["peak_rss"][spec]["peak_rss_mb"] for r in results.values()],
            fmt="10.0f",
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fast smoke run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads for both (0: torch's default)")
    parser.add_argument("--models", default="smollm2,gemma3", help="comma-separated: smollm2, gemma3")
    parser.add_argument("--rows", default="2,4,8,16", help="batch sizes of the batched decode")
    parser.add_argument("--batch-tokens", type=int, default=32, help="new tokens per row, batched decode")
    parser.add_argument("--compile", default="smollm2", help="models whose decode step is also compiled")
    parser.add_argument(
        "--profile", action="store_true", help="only the per-operator decode profile (parts_profile.json)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    if args.profile:
        results = {model: profile_decode(model) for model in args.models.split(",")}
        out = ROOT / "tools" / "bench" / "results" / "parts_profile.json"
    else:
        results = {model: bench_model(model, args) for model in args.models.split(",")}
        print_table(results)
        out = ROOT / "tools" / "bench" / "results" / "parts.json"
    saved = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python", "tools/bench/bench_parts.py", *sys.argv[1:]]),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "models": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(saved, indent=2))
    tmp.replace(out)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
