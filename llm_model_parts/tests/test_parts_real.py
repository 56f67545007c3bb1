"""The real checkpoints (SmolLM2-135M-Instruct, Gemma-3-270M) against transformers: logits within 1e-3
and the same greedy continuation of a chat prompt; and peak memory of loading a layer range."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from parts_testlib import fixtures
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_model_parts import chain, load_part

NEW_TOKENS = {"smollm2": 16, "gemma3": 8}


# Gemma's chat format, for a tokenizer saved without its template (the GGUF-derived fixture has none).
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def chat_prompt(path) -> torch.Tensor:  # type: ignore[no-untyped-def]
    tok = AutoTokenizer.from_pretrained(path)
    chat = [{"role": "user", "content": "Write a short poem about a lighthouse keeper and the sea."}]
    template = None if tok.chat_template else GEMMA_TEMPLATE
    out = tok.apply_chat_template(
        chat, chat_template=template, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return out["input_ids"]


def greedy(f, ids: torch.Tensor, n: int, eos: set[int]) -> list[int]:  # type: ignore[no-untyped-def]
    logits = f(ids)
    out: list[int] = []
    for _ in range(n):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(nxt))
        if int(nxt) in eos:
            break
        logits = f(nxt)
    return out


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_real_checkpoint_matches_transformers(name: str) -> None:
    path = fixtures.real_checkpoint(name)
    ids = chat_prompt(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref_logits = hf(ids).logits
        ref_tokens = hf.generate(ids, max_new_tokens=NEW_TOKENS[name], do_sample=False)
    eos = hf.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    del hf
    part = load_part(path, "f")
    f = part.as_forward_func()
    with torch.inference_mode():
        logits = f(ids)
        torch.testing.assert_close(logits, ref_logits, atol=1e-3, rtol=0)
        f.reset()
        assert greedy(f, ids, NEW_TOKENS[name], eos) == ref_tokens[0, ids.shape[1] :].tolist()
    if name == "smollm2":  # parts on three "nodes" equal the full model
        del part, f
        n = 30
        parts = [load_part(path, spec) for spec in ("b 0-10", "10-20", f"20-{n} e")]
        with torch.inference_mode():
            torch.testing.assert_close(chain(parts)(ids), ref_logits, atol=1e-3, rtol=0)


RSS = """
import sys
import torch
from llm_model_parts import load_part

def peak():  # VmHWM: this process's peak RSS (ru_maxrss can carry the forking parent's over exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

before = peak()
part = load_part(sys.argv[1], sys.argv[2])
# Weights may be memory-mapped: run the part once so that every page it uses is resident.
with torch.inference_mode():
    x = torch.ones(1, 4, dtype=torch.long) if part.spec.begin else torch.ones(1, 4, part.config.hidden_size)
    part(x)
after = peak()
params = sum(p.numel() * p.element_size() for p in {id(p): p for p in part.parameters()}.values())
print(after - before, params)
"""


def test_loading_a_layer_range_allocates_only_those_layers() -> None:
    """Peak RSS of `load_part(path, "0-10")` and one forward, in a fresh process: those 10 of 30 layers only."""
    path = fixtures.real_checkpoint("smollm2")
    out = subprocess.run(
        [sys.executable, "-c", RSS, str(path), "0-10"], capture_output=True, text=True, check=True
    )
    delta, params = (int(x) for x in out.stdout.split())
    full_params = 4 * 134_515_008  # SmolLM2-135M, fp32, embeddings tied
    assert params == 10 * (full_params - 4 * (49152 * 576 + 576)) // 30  # 10 of 30 layers, no embeddings
    assert delta < 1.5 * params + 64e6, (delta, params)
    assert delta < full_params / 2, (delta, params)
