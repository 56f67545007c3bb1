"""Configs of the tiny random models that parity tests build with transformers (`AutoConfig.for_model`).

One entry per family and per feature worth its own model (RoPE scalings, sliding windows, biases ...).
Keys are fixture names; values are `AutoConfig.for_model` keyword arguments, `model_type` included.
Each config is small (a few hundred KB of weights) so that CI builds and runs all of them in seconds.
"""

from __future__ import annotations

from typing import Any

_BASE: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def _cfg(model_type: str, **overrides: Any) -> dict[str, Any]:
    return {"model_type": model_type, **_BASE, **overrides}


TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": _cfg("llama", rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "llama-tied": _cfg("llama", tie_word_embeddings=True, num_key_value_heads=4),
    "llama-mqa-bias": _cfg("llama", num_key_value_heads=1, attention_bias=True, mlp_bias=True),
    "llama-linear": _cfg(
        "llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    ),
    "llama-dynamic": _cfg(
        "llama",
        max_position_embeddings=32,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    ),
    "llama-yarn": _cfg(
        "llama",
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 10000.0,
        },
    ),
    "llama-llama3": _cfg(
        "llama",
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 500000.0,
        },
    ),
    "mistral": _cfg("mistral", sliding_window=8),
    "qwen2": _cfg("qwen2", use_sliding_window=False),
    "qwen3": _cfg("qwen3", head_dim=32),
    "phi3": _cfg("phi3", num_key_value_heads=4),
    "phi3-longrope": _cfg(
        "phi3",
        num_key_value_heads=4,
        original_max_position_embeddings=64,
        rope_parameters={
            "rope_type": "longrope",
            "short_factor": [1.0 + 0.05 * i for i in range(8)],
            "long_factor": [1.0 + 0.3 * i for i in range(8)],
            "rope_theta": 10000.0,
        },
    ),
    "qwen2-sliding": _cfg("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2),
    "gemma3_text-softcap": _cfg(
        "gemma3_text",
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2,
        query_pre_attn_scalar=16,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
    ),
    "gemma3_text": _cfg(
        "gemma3_text",
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2,
        query_pre_attn_scalar=16,
        tie_word_embeddings=True,
    ),
}

# Second wave (issue 6): Falcon, GPT-2, GPT-J, OPT, the MoE families, Llama 4 text. Families whose config
# names differ from Llama's (n_embd ...) spell their own fields instead of using _BASE.
_GPT_BASE: dict[str, Any] = dict(vocab_size=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_MOE = dict(intermediate_size=96)

TINY_CONFIGS.update(
    {
        "mixtral": _cfg("mixtral", num_local_experts=8, num_experts_per_tok=2, **_MOE),
        "mixtral-sliding": _cfg(
            "mixtral", num_local_experts=4, num_experts_per_tok=2, sliding_window=8, **_MOE
        ),
        "qwen2_moe": _cfg(
            "qwen2_moe",
            num_experts=16,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            decoder_sparse_step=1,
            mlp_only_layers=[2],
            use_sliding_window=False,
        ),
        "qwen3_moe": _cfg(
            "qwen3_moe",
            head_dim=32,
            num_experts=16,
            num_experts_per_tok=4,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            decoder_sparse_step=2,
        ),
    }
)

TINY_CONFIGS.update(
    {
        "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=4, n_head=4, n_positions=128, **_GPT_BASE),
        "gpt2-scaled": dict(
            model_type="gpt2",
            n_embd=64,
            n_layer=4,
            n_head=4,
            n_inner=96,
            n_positions=128,
            scale_attn_by_inverse_layer_idx=True,
            tie_word_embeddings=False,
            **_GPT_BASE,
        ),
        "gptj": dict(
            model_type="gptj", n_embd=64, n_layer=4, n_head=4, rotary_dim=8, n_positions=128, **_GPT_BASE
        ),
        "opt": dict(
            model_type="opt",
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            ffn_dim=128,
            max_position_embeddings=128,
            word_embed_proj_dim=64,
            **_GPT_BASE,
        ),
        "opt-350m-style": dict(
            model_type="opt",
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            ffn_dim=128,
            max_position_embeddings=128,
            word_embed_proj_dim=32,
            do_layer_norm_before=False,
            **_GPT_BASE,
        ),
        "falcon-7b-style": dict(
            model_type="falcon",
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            multi_query=True,
            parallel_attn=True,
            new_decoder_architecture=False,
            alibi=False,
            bias=False,
            **_GPT_BASE,
        ),
        "falcon-40b-style": dict(
            model_type="falcon",
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_kv_heads=2,
            new_decoder_architecture=True,
            parallel_attn=True,
            alibi=False,
            bias=False,
            tie_word_embeddings=False,
            **_GPT_BASE,
        ),
        "falcon-rw-alibi": dict(
            model_type="falcon",
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            multi_query=False,
            parallel_attn=False,
            new_decoder_architecture=False,
            alibi=True,
            bias=True,
            **_GPT_BASE,
        ),
    }
)

_DEEPSEEK: dict[str, Any] = dict(
    num_key_value_heads=4,
    moe_intermediate_size=32,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    routed_scaling_factor=2.5,
    kv_lora_rank=32,
    q_lora_rank=48,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
)

TINY_CONFIGS.update(
    {
        "deepseek_v3": _cfg(
            "deepseek_v3",
            **_DEEPSEEK,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "rope_theta": 10000.0,
            },
        ),
        "deepseek_v3-no-q-lora": _cfg(
            "deepseek_v3", **{**_DEEPSEEK, "q_lora_rank": None, "rope_interleave": False}
        ),
        "llama4_text": _cfg(
            "llama4_text",
            head_dim=16,
            intermediate_size_mlp=96,
            num_local_experts=8,
            num_experts_per_tok=2,
            interleave_moe_layer_step=2,
            no_rope_layer_interval=2,
            attention_chunk_size=8,
            floor_scale=8,
            attn_scale=0.1,
            use_qk_norm=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    }
)
