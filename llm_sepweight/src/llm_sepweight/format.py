"""The sepweight directory: file names, the manifest, and atomic writes."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from llm_sepweight.manifest import FORMAT as FORMAT
from llm_sepweight.manifest import MANIFEST as MANIFEST
from llm_sepweight.manifest import MAX_MANIFEST_BYTES, validate_manifest
from llm_sepweight.manifest import VERSION as VERSION
from llm_sepweight.manifest import ManifestError as ManifestError
from llm_sepweight.spec import PartSpec

BEGIN_FILE = "begin.safetensors"
END_FILE = "end.safetensors"
JOURNAL = ".sepweight-partial.json"  # present while a conversion into the directory is unfinished


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
    """The validated manifest of the sepweight directory `path` (`ManifestError` naming the field if bad)."""
    manifest_path = path / MANIFEST
    try:
        with open(manifest_path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise ManifestError(f"{manifest_path}: missing; {path} is not a sepweight directory") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{manifest_path}: larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ManifestError(f"{manifest_path}: not valid JSON ({e})") from None
    return validate_manifest(manifest, str(manifest_path))


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
