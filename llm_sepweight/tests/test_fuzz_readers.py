"""Fuzzing the readers of untrusted input: safetensors headers, manifests, GGUF files and part specs.

Two kinds, bounded for CI (a few thousand cases, seconds); `LLM_MICROLIBS_FUZZ=long` runs 25 times more
(or `python tools/bench/fuzz_long.py`, which prints the figures and saves them):
- mutation fuzzing (fuzz_engine.py) of valid files, in a worker process whose address space is capped and
  whose cases each have a deadline;
- property-based (Hypothesis) inputs built from the formats' own grammar.
Every outcome must be a result or a `ValueError` (the base of every llm_sepweight error type).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_sepweight import PartSpec
from llm_sepweight import format as fmt
from llm_sepweight.gguf import build_config
from llm_sepweight.gguf_tokenizer import build_tokenizer, check_tokenizer_metadata
from llm_sepweight.safetensors_file import read_header

LONG = os.environ.get("LLM_MICROLIBS_FUZZ") == "long"
SCALE = 25 if LONG else 1
CASES = {"spec": 3000, "safetensors": 2000, "manifest": 1500, "gguf": 2000}
ENGINE = Path(__file__).with_name("fuzz_engine.py")
PROPERTY = settings(
    max_examples=200 * SCALE, deadline=2000, suppress_health_check=[HealthCheck.too_slow], database=None
)


def run_engine(target: str, cases: int, seed: int = 13, timeout: float = 600) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(ENGINE), target, str(cases), str(seed)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"fuzz worker for {target} died ({done.returncode}): {done.stderr[-2000:]}"
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("target", sorted(CASES))
def test_mutation_fuzz(target: str) -> None:
    result = run_engine(target, CASES[target] * SCALE, timeout=600 if LONG else 120)
    assert result["cases"] == sum(result["outcomes"].values())
    assert not result["unexpected"], json.dumps(result["unexpected"][:3], indent=1)


# --- property-based --------------------------------------------------------------------------------------

_json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
_json = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
_dtypes = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "X", ""])
_entry = st.fixed_dictionaries(
    {
        "dtype": _dtypes | _json_scalars,
        "shape": st.lists(st.integers(-2, 2**40), max_size=4) | _json,
        "data_offsets": st.lists(st.integers(-2, 2**64), min_size=0, max_size=3) | _json,
    }
)


@PROPERTY
@given(
    st.dictionaries(st.text(max_size=8), _entry | _json, max_size=5),
    st.integers(0, 256),
    st.booleans(),
)
def test_safetensors_header_property(header: dict[str, Any], data_bytes: int, lie_about_length: bool) -> None:
    raw = json.dumps(header, allow_nan=True).encode()
    length = len(raw) + (7 if lie_about_length else 0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "h.safetensors"
        path.write_bytes(struct.pack("<Q", length) + raw + bytes(data_bytes))
        try:
            infos, _ = read_header(path)
        except ValueError:
            return
    for info in infos.values():
        assert info.nbytes >= 0 and all(d >= 0 for d in info.shape)


@PROPERTY
@given(st.dictionaries(st.sampled_from(["format", "version", "num_layers", "files", "config", "x"]), _json))
def test_manifest_property(manifest: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / fmt.MANIFEST).write_text(json.dumps(manifest))
        with contextlib.suppress(ValueError):
            fmt.read_manifest(Path(tmp))


_meta_value = st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | st.text(max_size=4)
_meta_value = _meta_value | st.lists(_meta_value, max_size=3)
_ARCH_KEYS = [
    "attention.head_count",
    "attention.head_count_kv",
    "embedding_length",
    "feed_forward_length",
    "block_count",
    "context_length",
    "attention.key_length",
    "rope.freq_base",
    "attention.layer_norm_rms_epsilon",
    "attention.sliding_window",
    "rope.scaling.type",
    "rope.scaling.factor",
]
_VALID = {
    "attention.head_count": 4,
    "attention.head_count_kv": 2,
    "embedding_length": 16,
    "feed_forward_length": 32,
    "block_count": 2,
}


@PROPERTY
@given(
    st.sampled_from(["llama", "qwen2", "gemma3", "phi3"]),
    st.dictionaries(st.sampled_from(_ARCH_KEYS), _meta_value, max_size=6),
    st.booleans(),
)
def test_gguf_metadata_property(arch: str, changed: dict[str, Any], start_valid: bool) -> None:
    meta: dict[str, Any] = {"general.architecture": arch}
    fields = {**(_VALID if start_valid else {}), **changed}
    meta.update({f"{arch}.{k}": v for k, v in fields.items()})
    try:
        config = build_config(meta, {"token_embd.weight"}, "fuzz.gguf")
    except ValueError as e:
        assert "fuzz.gguf" in str(e)
        return
    assert config["num_attention_heads"] >= 1 and config["head_dim"] >= 1
    assert config["num_attention_heads"] % config["num_key_value_heads"] == 0


_tokens = st.lists(st.text(min_size=1, max_size=6), min_size=0, max_size=12)


@PROPERTY
@given(
    st.sampled_from(["gpt2", "llama", "bpe", None]),
    _tokens | _meta_value,
    st.none() | st.lists(st.floats(allow_nan=False), max_size=12) | _meta_value,
    st.none() | st.lists(st.integers(0, 5), max_size=12),
    st.dictionaries(st.sampled_from(["bos_token_id", "eos_token_id", "merges"]), _meta_value, max_size=3),
)
def test_gguf_tokenizer_property(
    kind: Any, tokens: Any, scores: Any, types: Any, extra: dict[str, Any]
) -> None:
    meta: dict[str, Any] = {"general.architecture": "llama", "tokenizer.ggml.model": kind}
    for key, value in (("tokens", tokens), ("scores", scores), ("token_type", types), *extra.items()):
        if value is not None:
            meta[f"tokenizer.ggml.{key}"] = value
    try:
        check_tokenizer_metadata(meta, "fuzz.gguf")
    except ValueError as e:
        assert "fuzz.gguf" in str(e)
        return
    tokenizer, _ = build_tokenizer(meta)
    assert tokenizer["model"]["type"] == "BPE"


@PROPERTY
@given(st.text(alphabet="bef0123456789- \t\n", max_size=40), st.integers(-3, 2**40))
def test_spec_property(text: str, num_layers: int) -> None:
    try:
        spec = PartSpec.parse(text)
    except ValueError:
        return
    assert PartSpec.parse(str(spec)) == spec
    try:
        resolved = spec.resolve(num_layers)
    except ValueError:
        return
    assert all(r.stop <= num_layers for r in resolved.ranges)
