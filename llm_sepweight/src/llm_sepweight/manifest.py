"""The manifest's schema: every field's type and bounds checked before anything loops or allocates over it.

`manifest.json` cannot hold its own hash; it is protected by this validation instead (types, bounds, plain
file names, `num_layers` consistent with the files it lists, the weight files' own headers checked by
`verify`), and `verify` reports its SHA-256 so it can be compared with a published one
(`verify(path, manifest_sha256=...)`).

Version 2 adds `other_files` (config.json, tokenizer files, ... every file
of the directory that is not a weight file, each with `bytes` and `sha256`) and `source.fingerprint`.
Version 1 is still read.
"""

from __future__ import annotations

import re
from typing import Any

from llm_sepweight.safe_paths import UnsafePathError, plain_file_name
from llm_sepweight.safetensors_file import DTYPES

FORMAT = "sepweight"
VERSION = 2
READ_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
MAX_LAYERS = 100_000
MAX_MANIFEST_BYTES = 256_000_000
_SHA256 = re.compile(r"[0-9a-f]{64}")
_WEIGHT = re.compile(r"begin\.safetensors|end\.safetensors|mid\.(\d{5,})\.safetensors")


class ManifestError(ValueError):
    """A manifest that is missing, unreadable, malformed or disagrees with the directory."""


def validate_manifest(manifest: Any, where: str) -> dict[str, Any]:
    """`manifest` if it follows the schema, else `ManifestError` naming `where` and the field."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{where}: expected {{'format': 'sepweight', ...}}")
    version = manifest.get("version")
    if not _is_int(version) or version not in READ_VERSIONS:
        raise ManifestError(
            f"{where}: format version {version!r}; this llm_sepweight reads versions {list(READ_VERSIONS)}"
        )
    for key in ("num_layers", "files", "config"):
        if key not in manifest:
            raise ManifestError(f"{where}: missing key {key!r}")
    _field(manifest, "config", dict, where)
    _field(manifest, "architecture", str, where, optional=True)
    _field(manifest, "tied_embeddings", bool, where, optional=True)
    _field(manifest, "dtype", (str, type(None)), where, optional=True)
    _source(manifest.get("source"), where)
    num_layers = manifest["num_layers"]
    if not _is_int(num_layers) or not 0 <= num_layers <= MAX_LAYERS:
        raise ManifestError(
            f"{where}: 'num_layers' must be an integer in 0..{MAX_LAYERS}, got {num_layers!r}"
        )
    files = _field(manifest, "files", dict, where)
    for name, entry in files.items():
        _weight_entry(name, entry, where)
    _check_layers(files, num_layers, where)
    if version >= 2 or "other_files" in manifest:
        other = _field(manifest, "other_files", dict, where)
        for name, entry in other.items():
            _other_entry(name, entry, files, where)
    return manifest


def weight_layer(name: str) -> int | None:
    """The layer of `mid.NNNNN.safetensors`, None for begin/end (call on validated names only)."""
    m = _WEIGHT.fullmatch(name)
    return int(m.group(1)) if m and m.group(1) else None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _field(obj: dict[str, Any], key: str, kind: Any, where: str, *, optional: bool = False) -> Any:
    if key not in obj:
        if optional:
            return None
        raise ManifestError(f"{where}: missing key {key!r}")
    value = obj[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ManifestError(f"{where}: field {key!r} must be {names}, got {type(value).__name__}")
    return value


def _source(source: Any, where: str) -> None:
    if source is None:
        return
    if not isinstance(source, dict):
        raise ManifestError(f"{where}: field 'source' must be an object, got {type(source).__name__}")
    for key in ("kind", "name", "fingerprint"):
        _field(source, key, str, f"{where}: source", optional=True)


def _checked_name(name: str, where: str) -> str:
    try:
        return plain_file_name(name, where)
    except UnsafePathError as e:
        raise ManifestError(str(e)) from None


def _size_and_hash(name: str, entry: Any, where: str) -> None:
    at = f"{where}: files[{name!r}]"
    if not isinstance(entry, dict):
        raise ManifestError(f"{at} must be an object, got {type(entry).__name__}")
    size = entry.get("bytes")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestError(f"{at}: field 'bytes' must be a non-negative integer, got {size!r}")
    sha = entry.get("sha256")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise ManifestError(f"{at}: field 'sha256' must be 64 lowercase hex digits, got {sha!r:.80}")


def _weight_entry(name: Any, entry: Any, where: str) -> None:
    _checked_name(name, f"{where}: files")
    if not _WEIGHT.fullmatch(name):
        raise ManifestError(
            f"{where}: files: unexpected file name {name!r} (begin.safetensors, mid.NNNNN.safetensors, "
            "end.safetensors)"
        )
    _size_and_hash(name, entry, where)
    tensors = entry.get("tensors")
    at = f"{where}: files[{name!r}]"
    if not isinstance(tensors, list):
        raise ManifestError(f"{at}: field 'tensors' must be a list, got {type(tensors).__name__}")
    for i, t in enumerate(tensors):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise ManifestError(f"{at}: tensors[{i}] must be an object with a string 'name'")
        if not isinstance(t.get("dtype"), str) or t["dtype"] not in DTYPES:
            raise ManifestError(f"{at}: tensor {t['name']!r}: unknown dtype {t.get('dtype')!r}")
        shape = t.get("shape")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise ManifestError(
                f"{at}: tensor {t['name']!r}: 'shape' must be a list of non-negative integers"
            )


def _other_entry(name: Any, entry: Any, files: dict[str, Any], where: str) -> None:
    _checked_name(name, f"{where}: other_files")
    if name == MANIFEST or name in files or name.startswith(".") or _WEIGHT.fullmatch(name):
        raise ManifestError(f"{where}: other_files: {name!r} cannot be listed there")
    _size_and_hash(name, entry, where.replace("files", "other_files"))


def _check_layers(files: dict[str, Any], num_layers: int, where: str) -> None:
    """The mid files are exactly layers 0..num_layers-1 (checked before anyone loops over num_layers)."""
    layers = {layer for name in files if (layer := weight_layer(name)) is not None}
    count = sum(1 for name in files if weight_layer(name) is not None)
    beyond = sorted(i for i in layers if i >= num_layers)
    if beyond:
        raise ManifestError(f"{where}: lists layer {beyond[0]} but 'num_layers' is {num_layers}")
    if count != len(layers):
        raise ManifestError(f"{where}: lists the same layer under two file names")
    if len(layers) != num_layers:
        missing = next(i for i in range(num_layers) if i not in layers)  # num_layers <= MAX_LAYERS
        raise ManifestError(
            f"{where}: 'num_layers' is {num_layers} but it does not list mid.{missing:05d}.safetensors"
        )
