"""`verify`: check a sepweight directory against its manifest (files, sizes, tensors, SHA-256)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from llm_sepweight import format as fmt
from llm_sepweight.safetensors_file import DTYPE_NAMES, SafetensorsError, read_header
from llm_sepweight.spec import PartSpec

logger = logging.getLogger(__name__)


class VerifyError(ValueError):
    """A sepweight directory that disagrees with its manifest; the message names the file and tensor."""


def verify(path: str | Path, *, hashes: bool = True) -> None:
    """Raise `VerifyError` naming the first bad file (and tensor) of the sepweight directory `path`.

    Cheap checks (every expected file listed and present, sizes, headers, tensor names, dtypes and shapes)
    run over all files before the SHA-256 of each file is computed (`hashes=False` skips that).
    """
    path = Path(path)
    try:
        manifest = fmt.read_manifest(path)
    except fmt.ManifestError as e:
        raise VerifyError(str(e)) from None
    files = manifest["files"]
    spec = PartSpec(full=True).resolve(int(manifest["num_layers"]))
    for name in fmt.file_names(spec):
        if name not in files:
            raise VerifyError(f"{path / fmt.MANIFEST}: does not list {name}")
    for name, entry in files.items():
        _check_file(path / name, entry)
    if hashes:
        for name, entry in files.items():
            digest = _sha256(path / name)
            if digest != entry["sha256"]:
                raise VerifyError(
                    f"{path / name}: SHA-256 {digest} does not match the manifest's {entry['sha256']}"
                )
    logger.info("%s: %d files verified", path, len(files))


def _check_file(file: Path, entry: dict) -> None:
    if not file.is_file():
        raise VerifyError(f"{file}: missing (listed in manifest.json)")
    size = file.stat().st_size
    if size != entry["bytes"]:
        raise VerifyError(
            f"{file}: {size} bytes, the manifest says {entry['bytes']} (truncated or replaced?)"
        )
    try:
        infos, _ = read_header(file)
    except SafetensorsError as e:
        raise VerifyError(str(e)) from None
    listed = {t["name"]: t for t in entry["tensors"]}
    for name, t in listed.items():
        info = infos.get(name)
        if info is None:
            raise VerifyError(f"{file}: tensor {name!r} listed in the manifest is missing from the file")
        if DTYPE_NAMES[info.dtype] != t["dtype"] or list(info.shape) != list(t["shape"]):
            raise VerifyError(
                f"{file}: tensor {name!r} is {DTYPE_NAMES[info.dtype]} {list(info.shape)}, "
                f"the manifest says {t['dtype']} {list(t['shape'])}"
            )
    extra = sorted(set(infos) - set(listed))
    if extra:
        raise VerifyError(f"{file}: tensor {extra[0]!r} is in the file but not in the manifest")


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()
