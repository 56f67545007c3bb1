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


_MISSING: Any = object()
_MAX_INT = 1 << 40  # far above any real head count, width, layer count, vocabulary or context length


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
    config = build_config(meta, names, str(path))
    _check_tensors(path, reader.tensors, config, arch)
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


def _check_tensors(path: Path, tensors: list[Any], config: dict[str, Any], arch: str) -> None:
    """Layers inside block_count, and q/k rows that split into the heads the un-permutation needs."""
    n_layers = config["num_hidden_layers"]
    for t in tensors:
        m = re.match(r"blk\.(\d+)\.", t.name)
        if m and int(m.group(1)) >= n_layers:
            raise GGUFError(
                f"{path}: tensor {t.name!r} is past the {n_layers} layers of '{arch}.block_count'"
            )
        if arch in ("llama", "mistral") and (".attn_q." in t.name or ".attn_k." in t.name):
            heads = config["num_attention_heads" if ".attn_q." in t.name else "num_key_value_heads"]
            rows = int(t.shape[-1]) if t.shape else 0
            if rows % (2 * heads):
                raise GGUFError(
                    f"{path}: tensor {t.name!r} has {rows} rows, not a whole number of {heads} heads of even size"
                )


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


def build_config(
    meta: dict[str, Any], tensor_names: set[str], where: str = "<GGUF metadata>"
) -> dict[str, Any]:
    """An HF config.json (transformers 5 dialect) for the model the GGUF metadata describes.

    Every field is checked for its type and range first: `GGUFError` names `where` (the file) and the key.
    """
    arch = str(meta.get("general.architecture", ""))
    m = _Meta(meta, arch, where)
    heads = m.integer("attention.head_count")
    hidden = m.integer("embedding_length")
    kv_heads = m.integer("attention.head_count_kv", heads)
    if heads % kv_heads:
        raise m.error("attention.head_count_kv", f"{kv_heads} does not divide head_count {heads}")
    head_dim = m.integer("attention.key_length", 0, minimum=0) or m.integer(
        "rope.dimension_count", 0, minimum=0
    )
    if not head_dim:
        if hidden % heads:
            raise m.error("attention.head_count", f"{heads} does not divide embedding_length {hidden}")
        head_dim = hidden // heads
    tokens = meta.get("tokenizer.ggml.tokens") or []
    config: dict[str, Any] = {
        "architectures": [_CLASSES[arch]],
        "model_type": _MODEL_TYPES.get(arch, arch),
        "vocab_size": m.integer("vocab_size", len(tokens) if isinstance(tokens, list) else 0, minimum=0),
        "hidden_size": hidden,
        "intermediate_size": m.integer("feed_forward_length"),
        "num_hidden_layers": m.integer("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": m.integer("context_length", 2048),
        "rms_norm_eps": m.number("attention.layer_norm_rms_epsilon", 1e-6),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "dtype": "float32",
    }
    for key, meta_key in (
        ("unk_token_id", "unknown_token_id"),
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
    ):
        if f"tokenizer.ggml.{meta_key}" in meta:
            config[key] = m.integer(f"tokenizer.ggml.{meta_key}", minimum=0, prefixed=False)
    rope = _rope_parameters(m)
    if arch == "gemma3":
        config.update(_gemma3_fields(config, rope, m))
    else:
        config["hidden_act"] = "silu"
        config["rope_parameters"] = rope
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        if arch in ("llama", "mistral"):
            config["mlp_bias"] = "blk.0.ffn_up.bias" in tensor_names
        if arch in ("mistral", "qwen2", "qwen3") and m.get("attention.sliding_window"):
            config["sliding_window"] = m.integer("attention.sliding_window")
    return dict(sorted(config.items()))


class _Meta:
    """Typed, range-checked access to `<arch>.<key>` metadata, errors naming the file and the key."""

    def __init__(self, meta: dict[str, Any], arch: str, where: str) -> None:
        self.meta, self.arch, self.where = meta, arch, where

    def get(self, key: str, default: Any = None) -> Any:
        return self.meta.get(f"{self.arch}.{key}", default)

    def error(self, key: str, why: str, prefixed: bool = True) -> GGUFError:
        name = f"{self.arch}.{key}" if prefixed else key
        return GGUFError(f"{self.where}: GGUF metadata {name!r}: {why}")

    def integer(self, key: str, default: Any = _MISSING, *, minimum: int = 1, prefixed: bool = True) -> int:
        value = self.meta.get(f"{self.arch}.{key}" if prefixed else key, default)
        if value is _MISSING or value is None:
            raise self.error(key, "missing (needed to build config.json)", prefixed)
        if isinstance(value, list) and value and all(v == value[0] for v in value):
            value = value[0]  # a per-layer list with one value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {type(value).__name__} {value!r:.60}", prefixed)
        if not minimum <= value <= _MAX_INT:
            raise self.error(key, f"{value} is outside {minimum}..{_MAX_INT}", prefixed)
        return value

    def number(self, key: str, default: float) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
            raise self.error(key, f"expected a positive finite number, got {value!r:.60}")
        return float(value)


def _rope_parameters(m: _Meta) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": m.number("rope.freq_base", 10000.0)}
    kind = m.get("rope.scaling.type")
    if kind in ("linear", "yarn") and m.get("rope.scaling.factor"):
        rope["rope_type"] = kind
        rope["factor"] = m.number("rope.scaling.factor", 1.0)
        if m.get("rope.scaling.original_context_length"):
            rope["original_max_position_embeddings"] = m.integer("rope.scaling.original_context_length")
    return rope


def _gemma3_fields(config: dict[str, Any], rope: dict[str, Any], m: _Meta) -> dict[str, Any]:
    n = config["num_hidden_layers"]
    pattern = 6  # llama.cpp's gemma3: every sixth layer attends globally
    scalar = config["head_dim"]
    if config["hidden_size"] == 5376 and config["num_attention_heads"] == 32:  # the 27B model
        scalar = config["hidden_size"] // config["num_attention_heads"]
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": scalar,
        "sliding_window": m.integer("attention.sliding_window", 512),
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
