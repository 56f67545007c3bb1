"""llm_model_parts against transformers, side by side in one process (SmolLM2-135M-Instruct, fp32, CPU).

- greedy decode of N tokens: our Part's incremental forward_func (preallocated KV cache) against
  transformers' `generate` (same tokens required), and the same Part with its weights as stored
  (`decode_layout=False`), which shows what the decode layout adds;
- prefill of 256 tokens: our Part's forward against transformers' forward;
- the bandwidth bound for decode: bytes of weights read per token / measured memory read bandwidth;
- peak RSS of `load_part(path, "0-10")` against `load_part(path, "f")`, each in a fresh subprocess.

    python tools/bench/bench_parts.py            # full run; JSON in tools/bench/results/parts.json
    python tools/bench/bench_parts.py --quick    # smoke run
    python tools/bench/bench_parts.py --model gemma3   # Gemma-3-270M instead (parts_gemma3.json)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

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


def greedy_hf(model, ids: torch.Tensor, n: int) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
    )
    return out[0, ids.shape[1] :].tolist(), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fast smoke run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads for both (0: torch's default)")
    parser.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    new_tokens, prefill_len, repeats = (16, 64, 1) if args.quick else (64, 256, args.repeats)
    path = fixtures.real_checkpoint(args.model)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    part = load_part(path, "f")
    ff = part.as_forward_func()
    ff_stored = load_part(path, "f", decode_layout=False).as_forward_func()
    tok = AutoTokenizer.from_pretrained(path)
    request = "Write a short story about a lighthouse keeper who finds a message in a bottle."
    if tok.chat_template:
        chat = [{"role": "user", "content": request}]
        prompt = tok.apply_chat_template(
            chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        prompt = prompt["input_ids"]
    else:  # the Gemma-3 fixture's tokenizer has no chat template
        prompt = tok(request, return_tensors="pt")["input_ids"]
    prefill_ids = torch.randint(3, hf.config.vocab_size, (1, prefill_len))

    decode_ratio, stored_ratio, prefill_ratio, rows = [], [], [], []
    same_tokens = True
    with torch.inference_mode():
        greedy_ours(ff, prompt, 4)  # warm-up all
        greedy_ours(ff_stored, prompt, 4)
        greedy_hf(hf, prompt, 4)
        hf(prefill_ids)
        ff.reset()
        ff(prefill_ids)
        for r in range(repeats):
            ours_tokens, t_ours = greedy_ours(ff, prompt, new_tokens)
            hf_tokens, t_hf = greedy_hf(hf, prompt, new_tokens)
            stored_tokens, t_stored = greedy_ours(ff_stored, prompt, new_tokens)
            same_tokens &= ours_tokens == hf_tokens == stored_tokens
            t0 = time.perf_counter()
            hf(prefill_ids)
            t_hf_prefill = time.perf_counter() - t0
            ff.reset()
            t0 = time.perf_counter()
            ff(prefill_ids)  # writes the KV cache, as transformers' forward fills its DynamicCache
            t_ours_prefill = time.perf_counter() - t0
            decode_ratio.append(t_hf / t_ours)
            stored_ratio.append(t_hf / t_stored)
            prefill_ratio.append(t_ours_prefill / t_hf_prefill)
            rows.append(
                {
                    "ours_tok_s": new_tokens / t_ours,
                    "ours_as_stored_tok_s": new_tokens / t_stored,
                    "hf_tok_s": new_tokens / t_hf,
                    "ours_prefill_s": t_ours_prefill,
                    "hf_prefill_s": t_hf_prefill,
                }
            )
            print(
                f"run {r}: decode ours {new_tokens / t_ours:6.2f} tok/s (as stored {new_tokens / t_stored:6.2f}), "
                f"transformers {new_tokens / t_hf:6.2f} tok/s; "
                f"prefill {prefill_len} ours {t_ours_prefill:.3f} s, transformers {t_hf_prefill:.3f} s",
                flush=True,
            )
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in part.parameters()}.values())
    bandwidth = read_bandwidth()
    bound = bandwidth / weight_bytes
    ours_tok_s = statistics.median(r["ours_tok_s"] for r in rows)
    rss = {} if args.quick else {spec: peak_rss(path, spec) for spec in ("0-10", "f")}
    result = {
        "model": {"smollm2": "SmolLM2-135M-Instruct", "gemma3": "Gemma-3-270M"}[args.model] + " fp32 CPU",
        "threads": torch.get_num_threads(),
        "new_tokens": new_tokens,
        "prefill_tokens": prefill_len,
        "same_greedy_tokens": same_tokens,
        "decode_speedup_median": statistics.median(decode_ratio),
        "decode_speedup_as_stored_median": statistics.median(stored_ratio),
        "prefill_time_ratio_median": statistics.median(prefill_ratio),
        "runs": rows,
        "weight_bytes_per_token": weight_bytes,
        "read_bandwidth_gb_s": bandwidth / 1e9,
        "bandwidth_bound_tok_s": bound,
        "ours_fraction_of_bound": ours_tok_s / bound,
        "peak_rss": rss,
    }
    print()
    print(f"{'metric':44s} {'value':>10s}")
    print(
        f"{'decode tok/s ours / transformers (median)':44s} {result['decode_speedup_median']:10.3f}  (target >= 1.15)"
    )
    print(
        f"{'prefill time ours / transformers (median)':44s} {result['prefill_time_ratio_median']:10.3f}  (target <= 1.05)"
    )
    print(
        f"{'  weights as stored (decode_layout=False)':44s} {result['decode_speedup_as_stored_median']:10.3f}"
    )
    print(f"{'same greedy tokens':44s} {same_tokens!s:>10s}")
    print(
        f"{'bandwidth bound tok/s':44s} {bound:10.2f}  ({bandwidth / 1e9:.1f} GB/s, {weight_bytes / 1e6:.0f} MB/token)"
    )
    print(f"{'ours tok/s / bound':44s} {result['ours_fraction_of_bound']:10.3f}")
    for spec, r in rss.items():
        print(
            f"{'peak RSS load_part ' + repr(spec) + ' MB':44s} {r['peak_rss_mb']:10.0f}  (load delta {r['load_delta_mb']:.0f}, params {r['param_mb']:.0f})"
        )
    out = (
        ROOT
        / "tools"
        / "bench"
        / "results"
        / ("parts.json" if args.model == "smollm2" else "parts_gemma3.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
