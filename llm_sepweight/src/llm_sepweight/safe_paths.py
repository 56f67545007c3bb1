"""File names read from files (a manifest, an HF index) are never trusted: plain names inside one directory.

A name is accepted only when it is a non-empty string without a path separator, NUL or control character,
is not `.` or `..`, and, when the file exists, does not resolve (through a symlink) outside the directory.
Hugging Face's hub cache keeps a snapshot's files as symlinks into the repository's `blobs/` directory;
`allow_hub_cache=True` accepts those too (HF checkpoint directories only, never a sepweight directory).
"""

from __future__ import annotations

from pathlib import Path

_MAX_NAME = 255


class UnsafePathError(ValueError):
    """A file name from a file that points outside its directory (or is not a plain file name)."""


def plain_file_name(name: object, where: str) -> str:
    """`name` if it is a plain file name, else `UnsafePathError` naming `where` (the file and entry)."""
    if not isinstance(name, str) or not name:
        raise UnsafePathError(f"{where}: file name {name!r} is not a non-empty string")
    if (
        name in (".", "..")
        or "/" in name
        or "\\" in name
        or len(name) > _MAX_NAME
        or any(ord(c) < 32 for c in name)
    ):
        raise UnsafePathError(
            f"{where}: file name {name!r} is not a plain file name inside the directory "
            "(no '..', no absolute path, no subdirectory)"
        )
    return name


def inside(root: Path, name: object, where: str, *, allow_hub_cache: bool = False) -> Path:
    """`root / name`, refused before any open when `name` is not plain or resolves outside `root`."""
    name = plain_file_name(name, where)
    path = root / name
    if not path.is_symlink():
        return path
    target = path.resolve()
    allowed = [root.resolve()]
    if allow_hub_cache and root.resolve().parent.name == "snapshots":
        allowed.append(root.resolve().parent.parent / "blobs")
    if not any(target.parent == a or a in target.parents for a in allowed):
        raise UnsafePathError(f"{where}: {name!r} is a symlink to {target}, outside {root}")
    return path
