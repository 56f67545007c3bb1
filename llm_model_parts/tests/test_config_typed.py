"""Typed family configs: a `config.json` that leaves fields to the family's defaults builds the model
transformers builds from the same file; invalid values fail at build time naming the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llm_model_parts import ModelConfig, Part, load_part, supported_architectures
from llm_model_parts.families import get_family
from llm_model_parts.layers.ends import Begin, End

TOL = 1e-4

_SIZES: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4
)
_GPT_SIZES: dict[str, Any] = dict(vocab_size=256, n_embd=64, n_layer=4, n_head=4)

# The fewest fields a tiny model needs; everything else (epsilons, activations, RoPE, biases, windows,
# routing, LoRA ranks ...) is left to the family's defaults.
MINIMAL: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", **_SIZES),
    "mistral": dict(model_type="mistral", **_SIZES, num_key_value_heads=2),
    "qwen2": dict(model_type="qwen2", **_SIZES, num_key_value_heads=2),
    "qwen3": dict(model_type="qwen3", **_SIZES, num_key_value_heads=2),
    "phi3": dict(model_type="phi3", **_SIZES, pad_token_id=0),  # its default 32000 is past this vocabulary
    "gemma3_text": dict(model_type="gemma3_text", **_SIZES, num_key_value_heads=2),
    "falcon": dict(
        model_type="falcon", vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4
    ),
    "gpt2": dict(model_type="gpt2", **_GPT_SIZES),
    "gptj": dict(model_type="gptj", vocab_size=256, n_embd=256, n_layer=2, n_head=2),  # rotary_dim 64 of 128
    "opt": dict(
        model_type="opt",
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        ffn_dim=128,
    ),
    "mixtral": dict(model_type="mixtral", **_SIZES, num_key_value_heads=2),
    "qwen2_moe": dict(
        model_type="qwen2_moe", **_SIZES, num_key_value_heads=2, num_experts=8, moe_intermediate_size=32
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe", **_SIZES, num_key_value_heads=2, num_experts=8, moe_intermediate_size=32
    ),
    "deepseek_v3": dict(
        model_type="deepseek_v3", **_SIZES, n_routed_experts=16, moe_intermediate_size=32, kv_lora_rank=32
    ),
    "llama4_text": dict(
        model_type="llama4_text", **_SIZES, num_key_value_heads=2, head_dim=16, intermediate_size_mlp=96
    ),
}


# Fields a family's transformers class does not have are ignored by its model; so by ours.
STRAY: dict[str, dict[str, Any]] = {
    "qwen2-stray": {
        **MINIMAL["qwen2"],
        "attention_bias": True,
        "mlp_bias": True,
        "final_logit_softcapping": 3.0,
    },
    "llama-stray": {**MINIMAL["llama"], "final_logit_softcapping": 3.0, "query_pre_attn_scalar": 4},
}


def checkpoint(config: dict[str, Any], path: Path) -> Path:
    """A random tiny model saved by transformers, with `config` (the minimal dict) as its config.json."""
    fields = {k: v for k, v in config.items() if k != "model_type"}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **fields))
    model.save_pretrained(path)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_every_family_has_a_minimal_config() -> None:
    assert set(MINIMAL) == set(supported_architectures())


@pytest.mark.parametrize("name", sorted(MINIMAL) + sorted(STRAY))
def test_family_defaults_build_what_transformers_builds(name: str, tmp_path: Path) -> None:
    path = checkpoint({**MINIMAL, **STRAY}[name], tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    part = load_part(path, "f")
    ids = torch.randint(3, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = hf(ids).logits
        got = part(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOL


def test_deepseek_v3_gets_transformers_defaults() -> None:
    """Without `q_lora_rank`, `n_group` ... a DeepSeek-V3 config has a query LoRA and 8 routing groups."""
    config = ModelConfig.from_hf(MINIMAL["deepseek_v3"])
    assert (config.q_lora_rank, config.n_group, config.topk_group) == (1536, 8, 4)  # type: ignore[attr-defined]
    assert config.n_shared_experts == 1 and config.first_k_dense_replace == 3  # type: ignore[attr-defined]
    assert config.head_dim == 64 and config.num_key_value_heads == 4
    part = Part.from_config(MINIMAL["deepseek_v3"], "3-4")
    assert hasattr(part.layers[0].self_attn, "q_a_proj")
    assert part.layers[0].mlp.gate.n_group == 8


def test_llama4_chunks_attention_by_default() -> None:
    config = ModelConfig.from_hf(MINIMAL["llama4_text"])
    assert config.attention_chunk_size == 8192  # type: ignore[attr-defined]
    part = Part.from_config(MINIMAL["llama4_text"], "0-4")
    chunks = [layer.self_attn.chunk_size for layer in part.layers]
    assert chunks == [8192, 8192, 8192, None]  # NoPE every 4th layer attends globally


def test_qwen3_moe_derives_head_dim() -> None:
    assert ModelConfig.from_hf(MINIMAL["qwen3_moe"]).head_dim == 16


@pytest.mark.parametrize("name", ["gpt2", "gptj", "falcon"])
def test_layer_norms_read_layer_norm_epsilon(name: str) -> None:
    config = {**MINIMAL[name], "layer_norm_epsilon": 1e-3, "rms_norm_eps": 0.5}
    part = Part.from_config(config, "b 0-2 e" if name != "gptj" else "f")
    norms = [m for m in part.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == 1e-3 for m in norms)


def test_opt_options_are_typed() -> None:
    config = {
        **MINIMAL["opt"],
        "enable_bias": False,
        "do_layer_norm_before": False,
        "word_embed_proj_dim": 32,
    }
    parsed = ModelConfig.from_hf(config)
    assert parsed.enable_bias is False and parsed.word_embed_proj_dim == 32  # type: ignore[attr-defined]
    part = Part.from_config(config, "b 0-1 e")
    assert part.layers[0].fc1.bias is None and "final_layer_norm.weight" not in dict(part.named_parameters())
    assert ModelConfig.from_hf(MINIMAL["opt"]).word_embed_proj_dim == 64  # type: ignore[attr-defined]


def test_zero_is_a_count_where_hf_allows_it() -> None:
    qwen2 = {**MINIMAL["qwen2"], "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}
    assert ModelConfig.from_hf(qwen2).layer_types == ("sliding_attention",) * 4
    dense = ModelConfig.from_hf({**MINIMAL["deepseek_v3"], "first_k_dense_replace": 0, "n_shared_experts": 0})
    assert (dense.first_k_dense_replace, dense.n_shared_experts) == (0, 0)  # type: ignore[attr-defined]


def test_raw_is_kept_verbatim() -> None:
    assert ModelConfig.from_hf(MINIMAL["gpt2"]).raw == MINIMAL["gpt2"]


def test_vlm_image_token_id_is_a_typed_field() -> None:
    outer = {"model_type": "llava", "image_token_index": 7, "text_config": MINIMAL["llama"]}
    assert ModelConfig.from_hf(outer).image_token_id == 7
    assert ModelConfig.from_hf({**MINIMAL["llama"], "image_token_id": 5}).image_token_id == 5


@pytest.mark.parametrize("name", sorted(MINIMAL))
def test_begin_and_end_are_always_the_familys(name: str) -> None:
    family = get_family(name)
    config = ModelConfig.from_hf(MINIMAL[name])
    assert isinstance(config, family.config_class)
    with torch.device("meta"):
        assert isinstance(family.build_begin(config), Begin)
        assert isinstance(family.build_end(config), End)


def test_llama_begin_and_end_have_hf_names() -> None:
    part = Part.from_config(MINIMAL["llama"], "b e")
    assert set(dict(part.named_parameters())) == {"embed_tokens.weight", "norm.weight", "lm_head.weight"}


def test_activation_names_match_the_layers() -> None:
    from llm_model_parts.config import HIDDEN_ACTS
    from llm_model_parts.layers.mlp import ACTIVATIONS

    assert set(HIDDEN_ACTS) == set(ACTIVATIONS)


# --- invalid values -------------------------------------------------------------------------------------

INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("llama", {"num_attention_heads": 0}, "num_attention_heads must be positive"),
    ("llama", {"num_key_value_heads": -2}, "num_key_value_heads must be positive"),
    ("llama", {"num_hidden_layers": 0}, "num_hidden_layers must be positive"),
    ("llama", {"hidden_size": -64}, "hidden_size must be positive"),
    ("llama", {"intermediate_size": 0}, "intermediate_size must be positive"),
    ("llama", {"vocab_size": 0}, "vocab_size must be positive"),
    ("llama", {"head_dim": 0}, "head_dim must be positive"),
    ("llama", {"max_position_embeddings": -1}, "max_position_embeddings must be positive"),
    ("llama", {"rms_norm_eps": 0.0}, "rms_norm_eps must be a positive epsilon"),
    ("llama", {"rms_norm_eps": -1e-6}, "rms_norm_eps must be a positive epsilon"),
    ("gpt2", {"layer_norm_epsilon": 0}, "layer_norm_epsilon must be a positive epsilon"),
    ("falcon", {"layer_norm_epsilon": -1.0}, "layer_norm_epsilon must be a positive epsilon"),
    ("llama", {"num_attention_heads": 5, "num_key_value_heads": 5}, "num_attention_heads=5 does not divide"),
    ("gpt2", {"n_head": 5}, "num_attention_heads=5 does not divide hidden_size=64"),
    ("llama", {"num_key_value_heads": 3}, "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ("llama", {"hidden_size": "64"}, "hidden_size must be an integer, got '64'"),
    ("llama", {"num_hidden_layers": True}, "num_hidden_layers must be an integer, got True"),
    ("llama", {"num_hidden_layers": 2.5}, "num_hidden_layers must be an integer"),
    ("llama", {"rms_norm_eps": "1e-6"}, "rms_norm_eps must be a number"),
    ("llama", {"rms_norm_eps": False}, "rms_norm_eps must be a number"),
    ("llama", {"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
    ("llama", {"hidden_act": "swishy"}, "hidden_act: unsupported value 'swishy'"),
    ("gpt2", {"activation_function": "tanh"}, "activation_function: unsupported value 'tanh'"),
    ("gemma3_text", {"hidden_activation": 3}, "hidden_activation must be a string"),
    ("falcon", {"activation": "nope"}, "activation: unsupported value 'nope'"),
    ("opt", {"enable_bias": "no"}, "enable_bias must be true or false"),
    ("opt", {"ffn_dim": 0}, "ffn_dim must be positive"),
    ("deepseek_v3", {"q_lora_rank": "1536"}, "q_lora_rank must be an integer or null"),
    ("deepseek_v3", {"n_group": 0}, "n_group must be positive"),
    ("deepseek_v3", {"n_shared_experts": -1}, "n_shared_experts must not be negative"),
    ("qwen2_moe", {"num_experts_per_tok": 0}, "num_experts_per_tok must be positive"),
    ("qwen2_moe", {"mlp_only_layers": [1, "2"]}, r"mlp_only_layers\[1\] must be an integer"),
    ("mixtral", {"num_local_experts": "8"}, "num_local_experts must be an integer"),
    ("llama4_text", {"attention_chunk_size": 0}, "attention_chunk_size must be positive"),
    ("gptj", {"rotary_dim": -8}, "rotary_dim must be positive"),
    ("mistral", {"sliding_window": -4}, "sliding_window must be a positive integer"),
    ("qwen2", {"use_sliding_window": 1}, "use_sliding_window must be true or false"),
    ("qwen2", {"max_window_layers": -1}, "max_window_layers must not be negative"),
    ("deepseek_v3", {"first_k_dense_replace": -1}, "first_k_dense_replace must not be negative"),
]


@pytest.mark.parametrize(
    ("name", "change", "message"), INVALID, ids=[f"{n}-{next(iter(c))}" for n, c, _ in INVALID]
)
def test_invalid_value_fails_at_build_naming_the_field(
    name: str, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=f"config field {message}"):
        ModelConfig.from_hf({**MINIMAL[name], **change})


def test_unknown_model_type_lists_the_supported() -> None:
    with pytest.raises(ValueError, match=r"model_type 'nope' is not supported.*supported: deepseek_v3"):
        ModelConfig.from_hf({**MINIMAL["llama"], "model_type": "nope"})
