"""Name rules of the families beyond tools/tiny_configs.py, on tiny models transformers builds here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sw_helpers import assert_same, expected_from_files

from llm_sepweight import Checkpoint, convert
from llm_sepweight.names import Location, locate, rule_for, split_names

_SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
FAMILIES: dict[str, dict] = {
    "gpt2": dict(model_type="gpt2", vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=64),
    "gptj": dict(
        model_type="gptj", vocab_size=64, n_embd=32, n_layer=3, n_head=4, rotary_dim=4, n_positions=64
    ),
    "opt": dict(
        model_type="opt",
        vocab_size=64,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        word_embed_proj_dim=16,
        max_position_embeddings=64,
    ),
    "falcon": dict(
        model_type="falcon", vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4
    ),
    "mixtral": dict(
        model_type="mixtral", **_SMALL, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2
    ),
    "qwen2_moe": dict(
        model_type="qwen2_moe",
        **_SMALL,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        **_SMALL,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        head_dim=8,
    ),
    "deepseek_v3": dict(
        model_type="deepseek_v3",
        **_SMALL,
        num_key_value_heads=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        n_group=1,
        topk_group=1,
        n_shared_experts=1,
    ),
    "llama4_text": dict(
        model_type="llama4_text",
        **_SMALL,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=2,
        intermediate_size_mlp=64,
        interleave_moe_layer_step=2,
    ),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    from transformers import AutoConfig, AutoModelForCausalLM

    out = {}
    for name, kwargs in FAMILIES.items():
        kwargs = dict(kwargs)
        config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, max_shard_size="100KB")
        out[name] = (path, AutoModelForCausalLM.from_pretrained(path).eval())
    return out


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_parts_match_transformers(name: str, built: dict, tmp_path: Path) -> None:
    src, model = built[name]
    for path in (src, convert(src, tmp_path / "sw", progress=False)):
        ckpt = Checkpoint(path)
        assert ckpt.num_layers == 3
        outer, layers = expected_from_files(src, model, 3)
        parts = ckpt.load("f")
        assert parts.begin is not None and parts.end is not None
        assert_same({**parts.begin, **parts.end}, outer, f"{name} begin+end")
        for i, want in enumerate(layers):
            assert_same(parts.mid[i], want, f"{name} layer {i}")


def test_family_sections() -> None:
    opt = split_names(
        "opt",
        [
            "model.decoder.embed_tokens.weight",
            "model.decoder.embed_positions.weight",
            "model.decoder.project_in.weight",
            "model.decoder.layers.0.fc1.weight",
            "model.decoder.project_out.weight",
            "model.decoder.final_layer_norm.weight",
            "lm_head.weight",
        ],
    )
    assert [loc.section for loc in opt.values()] == ["begin", "begin", "begin", "mid", "end", "end", "end"]
    assert opt["model.decoder.project_in.weight"].name == "project_in.weight"
    gpt2 = rule_for("gpt2")
    assert locate(gpt2, "wpe.weight") == Location("begin", None, "wpe.weight")  # saved without "transformer."
    assert locate(gpt2, "h.1.attn.c_attn.weight") == Location("mid", 1, "attn.c_attn.weight")
    assert locate(gpt2, "h.1.attn.masked_bias") is None
    falcon = rule_for("falcon")
    assert locate(falcon, "transformer.word_embeddings.weight") == Location(
        "begin", None, "word_embeddings.weight"
    )


@pytest.mark.parametrize("prefix", ["model.language_model.", "language_model.model."])
def test_gemma3_multimodal_names(prefix: str) -> None:
    rule = rule_for("gemma3")
    head = "lm_head.weight" if prefix.startswith("model.") else "language_model.lm_head.weight"
    assert locate(rule, f"{prefix}embed_tokens.weight") == Location("begin", None, "embed_tokens.weight")
    assert locate(rule, f"{prefix}layers.5.self_attn.q_norm.weight") == Location(
        "mid", 5, "self_attn.q_norm.weight"
    )
    assert locate(rule, f"{prefix}norm.weight") == Location("end", None, "norm.weight")
    assert locate(rule, head) == Location("end", None, "lm_head.weight")
    vision = "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    assert locate(rule, vision) == Location(
        "begin", None, "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    )
    assert locate(rule, "multi_modal_projector.mm_input_projection_weight").section == "begin"


def test_generic_rule_for_unknown_architectures() -> None:
    names = [
        "backbone.emb.weight",
        "backbone.blocks.0.attn.weight",
        "backbone.blocks.1.attn.weight",
        "backbone.norm_f.weight",
        "head.weight",
    ]
    located = split_names("mamba_like", names)
    assert located["backbone.emb.weight"] == Location("begin", None, "emb.weight")
    assert located["backbone.blocks.1.attn.weight"] == Location("mid", 1, "attn.weight")
    assert located["backbone.norm_f.weight"] == Location("end", None, "norm_f.weight")
    with pytest.raises(ValueError, match=r"head\.weight"):
        split_names("llama", ["model.layers.0.x.weight", "head.weight"])
    with pytest.raises(ValueError, match="cannot find decoder layers"):
        split_names("unknown", ["a.weight", "b.weight"])


def test_layers_past_num_hidden_layers_are_left_out() -> None:
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.weight", "model.layers.1.eh_proj.weight"]
    assert sorted(split_names("deepseek_v3", names, num_layers=1)) == names[:2]
