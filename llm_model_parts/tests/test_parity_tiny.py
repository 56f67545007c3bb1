"""Every family and RoPE scaling against transformers on tiny random checkpoints: a left-padded batch,
prefill and 20 cached greedy decode steps, our full part and a chain of three parts, fp32 within 1e-4."""

from __future__ import annotations

import json

import pytest
import torch
from parts_testlib import TINY_CONFIGS, fixtures, hf_positions, left_padded
from transformers import AutoModelForCausalLM, DynamicCache

from llm_model_parts import Part, chain, load_part

TOL = 1e-4
STEPS = 20
# The families of issue 3; later families add their own parity tests over their configs.
FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text"}
NAMES = sorted(name for name, cfg in TINY_CONFIGS.items() if cfg["model_type"] in FAMILIES)


def prompt_lengths(name: str) -> list[int]:
    if "longrope" in name:  # original length 64: cross it during decode
        return [60, 48, 55]
    if "dynamic" in name:  # max_position_embeddings 32: cross it during decode
        return [16, 9, 13]
    return [12, 7, 10]  # longer than the sliding windows (8)


def hf_model(name: str) -> torch.nn.Module:
    # transformers' SDPA path ignores attention logit softcapping; the eager path applies it.
    attn = "eager" if TINY_CONFIGS[name].get("attn_logit_softcapping") else "sdpa"
    path = fixtures.tiny_checkpoint(name)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()


@pytest.mark.parametrize("name", NAMES)
def test_prefill_and_cached_decode_match_transformers(name: str) -> None:
    path = fixtures.tiny_checkpoint(name)
    hf = hf_model(name)
    config = json.loads((path / "config.json").read_text())
    n = config["num_hidden_layers"]
    full = load_part(path, "f")
    parts = [load_part(path, spec) for spec in ("b 0-1", f"1-{n - 1}", f"{n - 1}-{n} e")]
    funcs = [full.as_forward_func(), chain(parts).as_forward_func()]
    ids, mask = left_padded(config["vocab_size"], prompt_lengths(name))
    real = mask.bool()
    with torch.inference_mode():
        cache = DynamicCache(config=hf.config)
        ref = hf(
            ids, attention_mask=mask, position_ids=hf_positions(mask), past_key_values=cache, use_cache=True
        ).logits
        for f in funcs:
            torch.testing.assert_close(f(ids, attention_mask=mask)[real], ref[real], atol=TOL, rtol=0)
        ours_next = ref_next = ref[:, -1].argmax(-1, keepdim=True)
        ref_tokens, our_tokens = [], []
        for _ in range(STEPS):
            ref_tokens.append(ref_next)
            our_tokens.append(ours_next)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            position = hf_positions(mask)[:, -1:]
            ref = hf(
                ref_next, attention_mask=mask, position_ids=position, past_key_values=cache, use_cache=True
            ).logits
            outs = [f(ours_next, attention_mask=mask) for f in funcs]
            for out in outs:
                torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
            ref_next, ours_next = ref[:, -1].argmax(-1, keepdim=True), outs[0][:, -1].argmax(-1, keepdim=True)
        assert torch.equal(torch.cat(our_tokens, 1), torch.cat(ref_tokens, 1))

        # Stateless (no cache) over the whole sequence, against transformers' full forward.
        seq = torch.cat([ids, *ref_tokens], dim=1)
        full.drop_cache()
        ref = hf(seq, attention_mask=mask, position_ids=hf_positions(mask)).logits
        torch.testing.assert_close(
            full(seq, attention_mask=mask)[mask.bool()], ref[mask.bool()], atol=TOL, rtol=0
        )


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma3_text"])
def test_unpadded_batch_and_chunked_prefill(name: str) -> None:
    """No mask at all, and a prompt fed in two chunks, equal transformers' single forward."""
    path = fixtures.tiny_checkpoint(name)
    hf = hf_model(name)
    part = load_part(path, "f")
    ids = torch.randint(3, 256, (2, 21))
    with torch.inference_mode():
        ref = hf(ids).logits
        torch.testing.assert_close(part(ids), ref, atol=TOL, rtol=0)
        f = part.as_forward_func()
        got = torch.cat([f(ids[:, :13]), f(ids[:, 13:])], dim=1)
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["llama", "gemma3_text", "phi3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_transformers(name: str, dtype: torch.dtype) -> None:
    """Computing in the weights' dtype like transformers does: logits agree to half-precision noise."""
    path = fixtures.tiny_checkpoint(name)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    part = load_part(path, "f", dtype=dtype)
    assert part.dtype == dtype
    ids, mask = left_padded(256, [12, 7])
    with torch.inference_mode():
        ref = hf(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits.float()
        got = part(ids, attention_mask=mask).float()
    real = mask.bool()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got[real], ref[real], atol=2e-2, rtol=2e-2)


def test_from_config_with_hf_state_dict() -> None:
    """Weights brought from elsewhere: a transformers state dict and its config dict."""
    hf = hf_model("qwen3")
    config = hf.config.to_dict()
    parts = [Part.from_config(config, spec, hf.state_dict()) for spec in ("b 0-2", "2-4 e")]
    ids = torch.randint(3, 256, (1, 9))
    with torch.inference_mode():
        torch.testing.assert_close(chain(parts)(ids), hf(ids).logits, atol=TOL, rtol=0)
