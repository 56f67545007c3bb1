"""GGUF input: tensors dequantized through the optional `gguf` package, HF names, config.json and tokenizer.

llama.cpp's converter changes some tensors on the way in; this undoes it:
- `attn_q` / `attn_k` rows of llama-architecture files are permuted for its rotary layout (per head,
  with the KV head count for `attn_k`);
- Gemma stores its RMSNorm weights as `1 + w`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm_sepweight.sources import Source, SourceTensor

logger = logging.getLogger(__name__)

# GGUF tensor name (after blk.N.) -> HF name inside layer N, per GGUF architecture family.
_LAYER_COMMON = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_NAMES: dict[str, dict[str, str]] = {
    "llama": _LAYER_COMMON,
    "mistral": _LAYER_COMMON,
    "qwen2": _LAYER_COMMON,
    "qwen3": _LAYER_COMMON,
    "phi3": {**_LAYER_COMMON, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
    "gemma3": {
        **_LAYER_COMMON,
        "ffn_norm": "pre_feedforward_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_SKIPPED = re.compile(r"^(rope_freqs|rope_factors_long|rope_factors_short)\.weight$")
_MODEL_TYPES = {"gemma3": "gemma3_text"}
_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}


class GGUFError(ValueError):
    """A GGUF file this converter cannot read (unknown architecture, tensor or quantization type)."""


def _require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ImportError(
            "reading .gguf files needs the optional gguf package: pip install 'llm-sepweight[gguf]'"
        ) from None
    return gguf


def gguf_source(path: Path) -> Source:
    from llm_sepweight.gguf_file import GGUFFile
    from llm_sepweight.gguf_tokenizer import tokenizer_files

    gguf = _require_gguf()
    reader = GGUFFile(path)
    meta = reader.metadata
    arch = str(meta.get("general.architecture", ""))
    if arch not in _LAYER_NAMES:
        raise GGUFError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {sorted(_LAYER_NAMES)}"
        )
    names = {t.name for t in reader.tensors}
    config = build_config(meta, names)
    tensors = []
    for t in reader.tensors:
        if _SKIPPED.match(t.name):
            continue
        hf_name = hf_tensor_name(arch, t.name)
        qtype = _quant_type(gguf, path, t)
        dtype = _PLAIN.get(qtype.name, torch.float32)
        shape = tuple(int(d) for d in reversed(t.shape))
        tensors.append(
            SourceTensor(hf_name, dtype, shape, _reader_fn(gguf, reader, t, arch, config, shape, dtype))
        )
    extra: dict[str, bytes | Path] = dict(tokenizer_files(meta, path))
    return Source("gguf", str(path.resolve()), config, tensors, extra)


_PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _quant_type(gguf: Any, path: Path, t: Any) -> Any:
    try:
        qtype = gguf.GGMLQuantizationType(t.type_id)
    except ValueError:
        raise GGUFError(
            f"{path}: tensor {t.name!r} has unknown GGUF quantization type {t.type_id}; expected one of "
            f"{[q.name for q in gguf.GGMLQuantizationType]} (a newer gguf package may know it)"
        ) from None
    if qtype.name not in _PLAIN and qtype not in gguf.quants._type_traits:
        raise GGUFError(
            f"{path}: tensor {t.name!r} has quantization type {qtype.name}, which gguf cannot dequantize"
        )
    return qtype


def hf_tensor_name(arch: str, gguf_name: str) -> str:
    stem, _, suffix = gguf_name.rpartition(".")
    if (m := re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)) and m.group(2) in _LAYER_NAMES[arch]:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[arch][m.group(2)]}.{suffix}"
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    raise GGUFError(f"GGUF tensor {gguf_name!r} has no HF name for architecture {arch!r}")


def _reader_fn(
    gguf: Any,
    reader: Any,
    t: Any,
    arch: str,
    config: dict[str, Any],
    shape: tuple[int, ...],
    dtype: torch.dtype,
) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        raw = reader.raw(t)
        if dtype is torch.float32 and raw.dtype != np.float32:
            raw = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(t.type_id))
        w = torch.from_numpy(np.array(raw, copy=True)).view(dtype).reshape(shape)
        if arch in ("llama", "mistral"):
            if ".attn_q." in t.name:
                w = unpermute(w, config["num_attention_heads"])
            elif ".attn_k." in t.name:
                w = unpermute(w, config["num_key_value_heads"])
        if arch == "gemma3" and t.name.endswith("norm.weight"):
            w = w - 1  # stored as 1 + w
        return w

    return read


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's rotary row permutation of a q/k projection (weight or bias) with `n_heads` heads."""
    rest = w.shape[1:]
    # llama.cpp stored, per head, rows (half, 2) where HF has (2, half): swap them back.
    return (
        w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape).contiguous()
    )


def build_config(meta: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """An HF config.json (transformers 5 dialect) for the model the GGUF metadata describes."""
    arch = str(meta["general.architecture"])

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    kv_heads = get("attention.head_count_kv", heads)
    head_dim = int(get("attention.key_length") or get("rope.dimension_count") or hidden // heads)
    tokens = meta.get("tokenizer.ggml.tokens") or []
    config: dict[str, Any] = {
        "architectures": [_CLASSES[arch]],
        "model_type": _MODEL_TYPES.get(arch, arch),
        "vocab_size": int(get("vocab_size") or len(tokens)),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads if not isinstance(kv_heads, list) else max(kv_heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "dtype": "float32",
    }
    if "tokenizer.ggml.unknown_token_id" in meta:
        config["unk_token_id"] = int(meta["tokenizer.ggml.unknown_token_id"])
    for key, meta_key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
    ):
        if f"tokenizer.ggml.{meta_key}" in meta:
            config[key] = int(meta[f"tokenizer.ggml.{meta_key}"])
    rope = _rope_parameters(get)
    if arch == "gemma3":
        config.update(_gemma3_fields(config, rope, get))
    else:
        config["hidden_act"] = "silu"
        config["rope_parameters"] = rope
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        if arch in ("llama", "mistral"):
            config["mlp_bias"] = "blk.0.ffn_up.bias" in tensor_names
        if arch in ("mistral", "qwen2", "qwen3") and get("attention.sliding_window"):
            config["sliding_window"] = int(get("attention.sliding_window"))
    return dict(sorted(config.items()))


def _rope_parameters(get: Callable[..., Any]) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(get("rope.freq_base", 10000.0))}
    kind = get("rope.scaling.type")
    if kind in ("linear", "yarn") and get("rope.scaling.factor"):
        rope["rope_type"] = kind
        rope["factor"] = float(get("rope.scaling.factor"))
        if get("rope.scaling.original_context_length"):
            rope["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
    return rope


def _gemma3_fields(config: dict[str, Any], rope: dict[str, Any], get: Callable[..., Any]) -> dict[str, Any]:
    n = config["num_hidden_layers"]
    pattern = 6  # llama.cpp's gemma3: every sixth layer attends globally
    scalar = config["head_dim"]
    if config["hidden_size"] == 5376 and config["num_attention_heads"] == 32:  # the 27B model
        scalar = config["hidden_size"] // config["num_attention_heads"]
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": scalar,
        "sliding_window": int(get("attention.sliding_window", 512)),
        "layer_types": [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)
        ],
        "rope_parameters": {
            "full_attention": rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        "attention_bias": False,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
    }
