"""The sepweight directory: file names, the manifest, and atomic writes."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from llm_sepweight.spec import PartSpec

FORMAT = "sepweight"
VERSION = 1
MANIFEST = "manifest.json"
BEGIN_FILE = "begin.safetensors"
END_FILE = "end.safetensors"


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or disagrees with the directory."""


def mid_file(layer: int) -> str:
    return f"mid.{layer:05d}.safetensors"


def file_names(spec: PartSpec) -> list[str]:
    """The weight files a (resolved) spec needs, in load order."""
    names = [BEGIN_FILE] if spec.begin else []
    names += [mid_file(i) for i in spec.layers]
    names += [END_FILE] if spec.end else []
    return names


def is_sepweight_dir(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{manifest_path}: missing; {path} is not a sepweight directory") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{manifest_path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{manifest_path}: expected {{'format': 'sepweight', ...}}")
    if manifest.get("version") != VERSION:
        raise ManifestError(
            f"{manifest_path}: format version {manifest.get('version')!r}; this llm_sepweight reads version {VERSION}"
        )
    for key in ("num_layers", "files", "config"):
        if key not in manifest:
            raise ManifestError(f"{manifest_path}: missing key {key!r}")
    return manifest


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[IO[bytes]]:
    """Write to a temporary file beside `path`; on success fsync it and rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_json(path: Path, obj: Any) -> None:
    with atomic_open(path) as f:
        f.write((json.dumps(obj, indent=1) + "\n").encode())
