"""Second-wave families of llm_model_parts against transformers, side by side in one process (CPU, fp32).

For each family: the tiny parity config scaled to about 100M parameters, random weights built by transformers
(`from_config`, saved to a temporary directory), then greedy decode of N tokens after a 16-token prompt with
our Part's incremental forward_func (preallocated KV cache) against transformers' `generate` (same tokens
required). One row per family: tokens/s of each and the ratio. MoE rows also give the share of decode time
spent in the expert blocks (router + dispatch + experts), measured with forward hooks in a separate pass.

    python tools/bench/bench_parts_more.py            # full run; JSON in tools/bench/results/parts_more.json
    python tools/bench/bench_parts_more.py --quick    # smoke run (smaller models, fewer tokens)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from tiny_configs import TINY_CONFIGS  # noqa: E402

from llm_model_parts import load_part  # noqa: E402

VOCAB = 32000
_LLAMA_SIZE = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=8)

# tiny config name -> the fields that scale it to about 100M parameters
SCALED: dict[str, dict[str, Any]] = {
    "falcon-7b-style": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "falcon-40b-style": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_kv_heads=4),
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024),
    "gptj": dict(n_embd=768, n_layer=12, n_head=12, rotary_dim=32, n_positions=1024),
    "opt": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072, word_embed_proj_dim=768
    ),
    "mixtral": dict(**_LLAMA_SIZE, intermediate_size=512, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(
        **_LLAMA_SIZE,
        intermediate_size=1024,
        moe_intermediate_size=256,
        shared_expert_intermediate_size=1024,
        num_experts=16,
        num_experts_per_tok=4,
    ),
    "qwen3_moe": dict(
        **_LLAMA_SIZE, head_dim=64, moe_intermediate_size=256, num_experts=16, num_experts_per_tok=4
    ),
    "deepseek_v3": dict(
        hidden_size=512,
        num_attention_heads=8,
        num_key_value_heads=8,
        num_hidden_layers=8,
        intermediate_size=1024,
        moe_intermediate_size=256,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        kv_lora_rank=128,
        q_lora_rank=192,
        qk_rope_head_dim=32,
        qk_nope_head_dim=64,
        v_head_dim=64,
    ),
    "llama4_text": dict(
        **_LLAMA_SIZE,
        head_dim=64,
        intermediate_size=512,
        intermediate_size_mlp=1024,
        num_local_experts=8,
        num_experts_per_tok=1,
        attention_chunk_size=8192,
        floor_scale=8192,
    ),
}
MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "llama4_text"}
_QUICK = {
    "hidden_size": 256,
    "n_embd": 256,
    "num_hidden_layers": 2,
    "n_layer": 2,
    "num_attention_heads": 4,
    "n_head": 4,
    "num_key_value_heads": 2,
    "num_kv_heads": 2,
}


def build(name: str, quick: bool, out: Path) -> tuple[torch.nn.Module, int]:
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = {**TINY_CONFIGS[name], **SCALED[name], "vocab_size": VOCAB, "max_position_embeddings": 1024}
    if quick:
        spec.update({k: v for k, v in _QUICK.items() if k in spec})
        if spec["model_type"] == "deepseek_v3":
            spec["num_key_value_heads"] = spec["num_attention_heads"]
    if spec["model_type"] == "gpt2" or spec["model_type"] == "gptj":
        spec.pop("max_position_embeddings")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**spec), dtype=torch.float32).eval()
    model.save_pretrained(out)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return model, params


def greedy_ours(ff: Any, ids: torch.Tensor, n: int) -> tuple[list[int], float]:
    ff.reset()
    t0 = time.perf_counter()
    logits = ff(ids)
    tokens = [int(logits[0, -1].argmax())]
    for _ in range(n - 1):
        logits = ff(torch.tensor([[tokens[-1]]]))
        tokens.append(int(logits[0, -1].argmax()))
    return tokens, time.perf_counter() - t0


def greedy_hf(model: Any, ids: torch.Tensor, n: int) -> tuple[list[int], float]:
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


def expert_share(part: Any, ids: torch.Tensor, n: int) -> float | None:
    """Fraction of decode time spent inside the MoE blocks (hooks timing each MoE module's forward)."""
    from llm_model_parts.layers.moe import DeepseekMoe, Llama4Moe, MixtralSparseMoe, QwenSparseMoe

    blocks = [
        m for m in part.modules() if isinstance(m, DeepseekMoe | Llama4Moe | MixtralSparseMoe | QwenSparseMoe)
    ]
    if not blocks:
        return None
    spent = [0.0]
    starts: dict[int, float] = {}
    handles = []
    for block in blocks:
        handles.append(
            block.register_forward_pre_hook(lambda m, a: starts.__setitem__(id(m), time.perf_counter()))
        )
        handles.append(
            block.register_forward_hook(
                lambda m, a, o: spent.__setitem__(0, spent[0] + time.perf_counter() - starts[id(m)])
            )
        )
    ff = part.as_forward_func()
    with torch.inference_mode():
        ff(ids)
        spent[0] = 0.0
        token = torch.tensor([[5]])
        t0 = time.perf_counter()
        for _ in range(n):
            ff(token)
        total = time.perf_counter() - t0
    for h in handles:
        h.remove()
    return spent[0] / total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller models and fewer tokens (smoke run)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens to generate (default 48, quick 8)")
    parser.add_argument("--families", nargs="*", default=list(SCALED), help="tiny config names to run")
    args = parser.parse_args()
    n = args.tokens or (8 if args.quick else 48)
    torch.set_num_threads(torch.get_num_threads())
    rows = []
    for name in args.families:
        with tempfile.TemporaryDirectory() as tmp:
            hf, params = build(name, args.quick, Path(tmp))
            part = load_part(tmp, "f")
        ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
        ff = part.as_forward_func()
        with torch.inference_mode():
            greedy_ours(ff, ids, 4)  # warm up both
            greedy_hf(hf, ids, 4)
            ours, t_ours = min((greedy_ours(ff, ids, n) for _ in range(2)), key=lambda r: r[1])
            ref, t_hf = min((greedy_hf(hf, ids, n) for _ in range(2)), key=lambda r: r[1])
        row = {
            "family": name,
            "params_m": params / 1e6,
            "tokens": n,
            "ours_tok_s": n / t_ours,
            "hf_tok_s": n / t_hf,
            "ratio": t_hf / t_ours,
            "same_tokens": ours == ref,
            "expert_share": expert_share(part, ids, n) if name in MOE else None,
        }
        rows.append(row)
        share = f"{row['expert_share']:.0%}" if row["expert_share"] is not None else "-"
        print(
            f"{name:18s} {row['params_m']:6.1f}M  ours {row['ours_tok_s']:7.1f} tok/s  hf {row['hf_tok_s']:7.1f} tok/s"
            f"  x{row['ratio']:.2f}  same tokens: {row['same_tokens']}  experts: {share}",
            flush=True,
        )
        del hf, part, ff
    out = (
        ROOT / "tools" / "bench" / "results" / ("parts_more_quick.json" if args.quick else "parts_more.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"device": "cpu", "dtype": "float32", "threads": torch.get_num_threads(), "rows": rows}, indent=2
        )
    )
    print(f"saved {out}")


if __name__ == "__main__":
    main()
