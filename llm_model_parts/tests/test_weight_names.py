"""Flat HF state dicts map to a part's names through llm_sepweight's name rules, for every family alike:
the body prefix (`model.`) optional, a tied head copied from the embedding, old buffers ignored."""

from __future__ import annotations

import torch
from parts_testlib import TINY_CONFIGS

from llm_model_parts import ModelConfig
from llm_model_parts.weights import to_part_names
from llm_sepweight import PartSpec

CONFIG = ModelConfig.from_hf(TINY_CONFIGS["llama-tied"])


def names(weights: dict[str, torch.Tensor], spec: str, config: ModelConfig = CONFIG) -> set[str]:
    return set(to_part_names(weights, PartSpec.parse(spec), config))


def llama_weights(prefix: str) -> dict[str, torch.Tensor]:
    t = torch.zeros(1)
    return {
        f"{prefix}embed_tokens.weight": t,
        f"{prefix}layers.0.self_attn.q_proj.weight": t,
        f"{prefix}layers.1.mlp.down_proj.weight": t,
        f"{prefix}layers.1.self_attn.rotary_emb.inv_freq": t,
        f"{prefix}norm.weight": t,
    }


def test_model_prefix_is_optional() -> None:
    expected = {"embed_tokens.weight", "layers.0.mlp.down_proj.weight", "norm.weight", "lm_head.weight"}
    assert names(llama_weights("model."), "b 1-2 e") == expected
    assert names(llama_weights(""), "b 1-2 e") == expected


def test_tied_head_copies_the_embedding_and_buffers_are_ignored() -> None:
    weights = llama_weights("model.")
    out = to_part_names(weights, PartSpec.parse("0-2 e"), CONFIG)
    assert out["lm_head.weight"] is weights["model.embed_tokens.weight"]
    assert not any("inv_freq" in n for n in out)
    assert "embed_tokens.weight" not in out  # begin is not in the part


def test_untied_head_is_not_made_up() -> None:
    untied = ModelConfig.from_hf(TINY_CONFIGS["llama"])
    assert "lm_head.weight" not in names(llama_weights("model."), "e", untied)


def test_gpt2_names_use_the_same_rules() -> None:
    gpt2 = ModelConfig.from_hf(TINY_CONFIGS["gpt2"])
    t = torch.zeros(1)
    weights = {
        "transformer.wte.weight": t,
        "transformer.h.3.attn.c_attn.weight": t,
        "transformer.ln_f.weight": t,
    }
    assert names(weights, "b 3-4 e", gpt2) == {
        "wte.weight",
        "layers.0.attn.c_attn.weight",
        "ln_f.weight",
        "lm_head.weight",
    }
