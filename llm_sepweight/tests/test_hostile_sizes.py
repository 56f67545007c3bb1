"""Sizes checked before they are trusted, and degenerate GGUF metadata named in the error (issue 13, classes 3, 5)."""

from __future__ import annotations

import struct
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from llm_sepweight import PartSpec, get_filenames
from llm_sepweight.gguf import GGUFError, build_config
from llm_sepweight.gguf_file import GGUFFile, GGUFFormatError
from llm_sepweight.gguf_tokenizer import MAX_MERGE_TOKEN, check_tokenizer_metadata, generate_merges


def test_huge_spec_is_rejected_before_expansion() -> None:
    tracemalloc.start()
    start = time.perf_counter()
    spec = PartSpec.parse("0-1000000")
    with pytest.raises(ValueError, match="'0-1000000' is outside the model"):
        spec.resolve(30)
    with pytest.raises(ValueError, match="limit"):
        PartSpec.parse("0-100000000")
    with pytest.raises(ValueError, match="cannot parse"):
        PartSpec.parse("0-" + "9" * 5000)  # past Python's int-digits limit: still the spec's own error
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20 and time.perf_counter() - start < 1.0
    assert spec.ranges == (range(0, 1000000),)


def test_huge_ranges_through_the_constructor_and_get_filenames() -> None:
    with pytest.raises(ValueError):
        PartSpec(layers=[range(0, 10**12)])
    with pytest.raises(ValueError):
        get_filenames("0-100000000")


# --- GGUF: a minimal file built by hand, then one field at a time made hostile ---------------------------


def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _kv_u32(key: str, value: int) -> bytes:
    return _s(key) + struct.pack("<II", 4, value)


def _gguf(kvs: list[bytes], *, n_tensors: int = 0, n_kv: int | None = None, tail: bytes = b"") -> bytes:
    count = len(kvs) if n_kv is None else n_kv
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, count) + b"".join(kvs) + tail


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "data, match",
    [
        (_gguf([], n_kv=2**62), "metadata count"),
        (_gguf([], n_tensors=2**40), "tensor count"),
        (_gguf([_s("k") + struct.pack("<IIQ", 9, 4, 2**60)]), "array of"),
        (_gguf([_s("k") + struct.pack("<IIQ", 9, 4, 10**6)]), "cannot fit"),
        (_gguf([_s("k") + struct.pack("<IIQ", 9, 8, 10**6)]), "cannot fit"),
        (_gguf([_s("k") + struct.pack("<I", 8) + struct.pack("<Q", 2**63)]), "cannot fit"),
        (
            _gguf([_s("k") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 6 + struct.pack("<IQ", 4, 0)]),
            "nested",
        ),
        (_gguf([struct.pack("<Q", 70000) + b"k" * 70000 + struct.pack("<II", 4, 1)]), "limit"),
        (_gguf([_kv_u32("general.alignment", 0)]), "general.alignment"),
        (_gguf([_kv_u32("general.alignment", 24)]), "general.alignment"),
        (_gguf([_kv_u32("a", 1), _kv_u32("a", 2)]), "twice"),
        (_gguf([_s("k") + struct.pack("<II", 77, 0)]), "value type 77"),
        (b"GG", "not a GGUF"),
        (b"", "not a GGUF"),
    ],
)
def test_hostile_gguf_counts_are_checked_first(tmp_path: Path, data: bytes, match: str) -> None:
    tracemalloc.start()
    with pytest.raises(GGUFFormatError, match=match) as info:
        GGUFFile(_write(tmp_path, data))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert "hostile.gguf" in str(info.value) and peak < 8 << 20


def test_tensor_offsets_and_dims_are_checked(tmp_path: Path) -> None:
    info = (
        _s("t") + struct.pack("<I", 1) + struct.pack("<Q", 32) + struct.pack("<IQ", 0, 3)
    )  # F32, misaligned
    with pytest.raises(GGUFFormatError, match="multiple of the alignment"):
        GGUFFile(_write(tmp_path, _gguf([], n_tensors=1, tail=info)))
    dims = _s("t") + struct.pack("<I", 99)
    with pytest.raises(GGUFFormatError, match="99 dimensions"):
        GGUFFile(_write(tmp_path, _gguf([], n_tensors=1, tail=dims + bytes(64))))


_OK: dict[str, Any] = {
    "general.architecture": "llama",
    "llama.attention.head_count": 4,
    "llama.embedding_length": 16,
    "llama.feed_forward_length": 32,
    "llama.block_count": 2,
}


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("llama.attention.head_count", 0, "head_count"),
        ("llama.attention.head_count", None, "missing"),
        ("llama.attention.head_count", "4", "expected an integer"),
        ("llama.attention.head_count", True, "expected an integer"),
        ("llama.attention.head_count", 3, "does not divide embedding_length"),
        ("llama.attention.head_count_kv", 3, "does not divide head_count"),
        ("llama.attention.head_count_kv", 0, "head_count_kv"),
        ("llama.block_count", -1, "block_count"),
        ("llama.feed_forward_length", [1, 2], "expected an integer"),
        ("llama.embedding_length", 2**80, "outside"),
        ("llama.rope.freq_base", 0.0, "positive finite"),
        ("llama.attention.layer_norm_rms_epsilon", float("nan"), "positive finite"),
        ("tokenizer.ggml.bos_token_id", -1, "bos_token_id"),
    ],
)
def test_degenerate_gguf_metadata_names_file_and_field(key: str, value: Any, match: str) -> None:
    meta = dict(_OK)
    if value is None:
        meta.pop(key)
    else:
        meta[key] = value
    with pytest.raises(GGUFError, match=match) as info:
        build_config(meta, set(), "model.gguf")
    assert "model.gguf" in str(info.value) and key in str(info.value)


def test_per_layer_list_with_one_value_is_accepted() -> None:
    config = build_config({**_OK, "llama.attention.head_count_kv": [2, 2]}, set(), "m.gguf")
    assert config["num_key_value_heads"] == 2 and config["head_dim"] == 4


@pytest.mark.parametrize(
    "meta, match",
    [
        ({"tokenizer.ggml.model": "llama"}, "tokens"),
        ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": "abc"}, "tokens"),
        (
            {
                "tokenizer.ggml.model": "llama",
                "tokenizer.ggml.tokens": ["a"],
                "tokenizer.ggml.scores": [1, 2],
            },
            "scores",
        ),
        (
            {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": ["a"]},
            "merges",
        ),
        ({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}, "model"),
        (
            {
                "tokenizer.ggml.model": "gpt2",
                "tokenizer.ggml.tokens": ["a"],
                "tokenizer.ggml.eos_token_id": "x",
            },
            "eos",
        ),
    ],
)
def test_degenerate_tokenizer_metadata(meta: dict[str, Any], match: str) -> None:
    with pytest.raises(GGUFError, match=match) as info:
        check_tokenizer_metadata(meta, "model.gguf")
    assert "model.gguf" in str(info.value)


def test_enormous_token_does_not_make_merges_quadratic() -> None:
    huge = "a" * 2_000_000
    vocab = {"a": 0, "aa": 1, huge: 2, huge[:-1]: 3}
    start = time.perf_counter()
    merges = generate_merges(vocab, {t: -i for t, i in vocab.items()})
    assert time.perf_counter() - start < 2.0
    assert merges == [("a", "a")]
    ok = "a" * MAX_MERGE_TOKEN
    assert (ok[:-1], "a") in generate_merges({"a": 0, ok[:-1]: 1, ok: 2}, {ok: 0.0})
