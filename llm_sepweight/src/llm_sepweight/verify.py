"""`verify`: check every byte of every file of a sepweight directory against its manifest.

Checked, in this order (cheap checks over all files before any hash): no unfinished conversion (journal);
the manifest's schema (`manifest.py`; `manifest.json` cannot hash itself); every name a plain file name
inside the directory (no `..`, absolute path, subdirectory or symlink out); every layer's file listed; no
file the manifest does not know about (`unknown="error"`, the default, or `"list"` to return them);
sizes; each weight file's safetensors header validated by the one reader (`safetensors_file.py`: no
overlapping offsets, no unaccounted bytes, no negative dimension) and equal to the manifest's tensors;
`config.json` equal to the manifest's `config`; then the SHA-256 of every file (weights, config.json,
tokenizer files, generation_config.json, everything copied).

Version 1 manifests list only the weight files: their other files are reported (logged and returned) as
not covered, never failed, since version 1 could not cover them; reconvert to get version 2.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from llm_sepweight import format as fmt
from llm_sepweight.safe_paths import UnsafePathError, inside
from llm_sepweight.safetensors_file import Header, SafetensorsError
from llm_sepweight.spec import PartSpec

logger = logging.getLogger(__name__)


class VerifyError(ValueError):
    """A sepweight directory that disagrees with its manifest; the message names the file and tensor."""


def verify(
    path: str | Path,
    *,
    hashes: bool = True,
    unknown: str = "error",
    manifest_sha256: str | None = None,
) -> list[str]:
    """Raise `VerifyError` naming the first bad file (and tensor) of the sepweight directory `path`.

    `hashes=False` skips the SHA-256 of the files (sizes and headers only). `unknown="error"` fails on a
    file the manifest does not list; `unknown="list"` logs and returns those names instead.
    `manifest_sha256` pins manifest.json itself to a digest published elsewhere. Returns the files present
    but not covered by the manifest (empty for a good version 2 directory).
    """
    if unknown not in ("error", "list"):
        raise ValueError(f"unknown={unknown!r}: expected 'error' or 'list'")
    path = Path(path)
    if (path / fmt.JOURNAL).exists():
        raise VerifyError(f"{path}: a conversion into it is unfinished ({fmt.JOURNAL}); rerun the conversion")
    return verify_contents(path, hashes=hashes, unknown=unknown, manifest_sha256=manifest_sha256)


def verify_contents(
    path: Path,
    *,
    hashes: bool = True,
    unknown: str = "error",
    manifest_sha256: str | None = None,
    ignore: frozenset[str] = frozenset(),
) -> list[str]:
    """`verify` without the check for an unfinished conversion; names in `ignore` are not unknown files."""
    manifest = _manifest(path, manifest_sha256)
    weights: dict[str, Any] = manifest["files"]
    others: dict[str, Any] = manifest.get("other_files", {})
    spec = PartSpec(full=True).resolve(manifest["num_layers"])  # bounded and consistent (manifest.py)
    for name in fmt.file_names(spec):
        if name not in weights:
            raise VerifyError(f"{path / fmt.MANIFEST}: does not list {name}")
    files = {name: _file(path, name) for name in {**weights, **others}}  # all names checked before any open
    extra = _unknown_files(path, files, manifest["version"], unknown, ignore)
    for name, entry in weights.items():
        _check_weight_file(files[name], entry)
    for name, entry in others.items():
        _check_size(files[name], entry)
    _check_config(path, manifest, others)
    if hashes:
        for name, entry in {**weights, **others}.items():
            digest = sha256_file(path / name)
            if digest != entry["sha256"]:
                raise VerifyError(
                    f"{path / name}: SHA-256 {digest} does not match the manifest's {entry['sha256']}"
                )
    logger.info("%s: %d files verified", path, len(weights) + len(others))
    return extra


def manifest_digest(path: str | Path) -> str:
    """The SHA-256 of `path/manifest.json` (publish it beside a directory to pin the manifest)."""
    return sha256_file(Path(path) / fmt.MANIFEST)


def sha256_file(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _manifest(path: Path, manifest_sha256: str | None) -> dict[str, Any]:
    try:
        manifest = fmt.read_manifest(path)
    except fmt.ManifestError as e:
        raise VerifyError(str(e)) from None
    if manifest_sha256 is not None and manifest_digest(path) != manifest_sha256.lower():
        raise VerifyError(
            f"{path / fmt.MANIFEST}: SHA-256 {manifest_digest(path)} is not the expected {manifest_sha256}"
        )
    return manifest


def _file(root: Path, name: str) -> Path:
    try:
        return inside(root, name, f"{root / fmt.MANIFEST}: files[{name!r}]")
    except UnsafePathError as e:
        raise VerifyError(str(e)) from None


def _unknown_files(
    path: Path, listed: dict[str, Any], version: int, unknown: str, ignore: frozenset[str]
) -> list[str]:
    present = sorted(os.listdir(path))
    extra = [n for n in present if n != fmt.MANIFEST and n not in listed and n not in ignore]
    if not extra:
        return []
    if version < 2:
        logger.warning("%s: manifest version 1 does not cover %s; reconvert for version 2", path, extra)
        return extra
    if unknown == "error":
        raise VerifyError(
            f"{path / extra[0]}: not listed in manifest.json ({len(extra)} unknown files: {extra[:5]}); "
            "remove it or verify with unknown='list'"
        )
    logger.warning("%s: files not listed in manifest.json: %s", path, extra)
    return extra


def _check_size(file: Path, entry: dict[str, Any]) -> None:
    if not file.is_file():
        raise VerifyError(f"{file}: missing (listed in manifest.json)")
    size = file.stat().st_size
    if size != entry["bytes"]:
        raise VerifyError(
            f"{file}: {size} bytes, the manifest says {entry['bytes']} (truncated or replaced?)"
        )


def _check_weight_file(file: Path, entry: dict[str, Any]) -> None:
    _check_size(file, entry)
    try:
        infos = Header.read(file).tensors
    except SafetensorsError as e:
        raise VerifyError(str(e)) from None
    listed = {t["name"]: t for t in entry["tensors"]}
    for name, t in listed.items():
        info = infos.get(name)
        if info is None:
            raise VerifyError(f"{file}: tensor {name!r} listed in the manifest is missing from the file")
        if info.dtype_name != t["dtype"] or list(info.shape) != list(t["shape"]):
            raise VerifyError(
                f"{file}: tensor {name!r} is {info.dtype_name} {list(info.shape)}, "
                f"the manifest says {t['dtype']} {list(t['shape'])}"
            )
    extra = sorted(set(infos) - set(listed))
    if extra:
        raise VerifyError(f"{file}: tensor {extra[0]!r} is in the file but not in the manifest")


def _check_config(path: Path, manifest: dict[str, Any], others: dict[str, Any]) -> None:
    """config.json is what transformers reads, manifest['config'] what Checkpoint reads: they must agree."""
    if "config.json" not in others:
        return
    try:
        config = json.loads((path / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise VerifyError(f"{path / 'config.json'}: not valid JSON ({e})") from None
    if config != manifest["config"]:
        raise VerifyError(f"{path / 'config.json'}: differs from the 'config' of manifest.json")
