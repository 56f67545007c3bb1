"""Safetensors read through one memory map per file, and written as a stream.

Reading parses the header (8-byte length + JSON) itself and makes tensors with `torch.frombuffer` over a
private (copy-on-write) map: no copy on CPU when no cast is needed, no pickle, and no per-tensor work beyond
one small Python call. Writing takes the header up front and then the tensors one at a time, hashing as it
goes, so converting a model never holds more than one tensor in memory.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

_MAX_HEADER = 100_000_000


class SafetensorsError(ValueError):
    """A safetensors file that is truncated, corrupted or not safetensors at all."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    stop: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor infos (absolute offsets) and the `__metadata__` of a safetensors file, checked against its size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise SafetensorsError(f"{path}: header length {n} does not fit in a {size}-byte file")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: corrupted safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: corrupted safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: tensor {name!r} has a bad header entry {entry!r}") from None
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise SafetensorsError(
                f"{path}: tensor {name!r} has offsets {begin}-{end} for shape {list(shape)}"
            )
        if base + end > size:
            raise SafetensorsError(
                f"{path}: truncated: tensor {name!r} ends at byte {base + end} but the file has {size} bytes"
            )
        infos[name] = TensorInfo(name, dtype, shape, base + begin, base + end)
    return infos, metadata


class MappedFile:
    """One safetensors file mapped once; `tensor(info)` is a zero-copy CPU view."""

    def __init__(self, path: Path, infos: dict[str, TensorInfo] | None = None) -> None:
        self.path = path
        self.infos = infos if infos is not None else read_header(path)[0]
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            # ACCESS_COPY: writable for torch.frombuffer (no warning), writes never reach the file.
            self._map = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) if size else None

    def tensor(self, info: TensorInfo) -> torch.Tensor:
        if info.nbytes == 0 or self._map is None:
            return torch.empty(info.shape, dtype=info.dtype)
        count = info.nbytes // info.dtype.itemsize
        return torch.frombuffer(self._map, dtype=info.dtype, count=count, offset=info.start).view(info.shape)

    def raw(self, start: int, stop: int) -> torch.Tensor:
        """Bytes [start, stop) as a uint8 view."""
        if self._map is None or stop <= start:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self._map, dtype=torch.uint8, count=stop - start, offset=start)

    def advise_willneed(self) -> None:
        if self._map is not None and hasattr(mmap, "MADV_WILLNEED"):
            self._map.madvise(mmap.MADV_WILLNEED)


def read_tensor(f: IO[bytes], info: TensorInfo) -> torch.Tensor:
    """Read one tensor into fresh memory with a positioned read (conversion: no map grows the RSS)."""
    buf = bytearray(info.nbytes)
    f.seek(info.start)
    got = f.readinto(buf)  # type: ignore[attr-defined]
    if got != info.nbytes:
        raise SafetensorsError(f"{getattr(f, 'name', '?')}: truncated while reading tensor {info.name!r}")
    if not buf:
        return torch.empty(info.shape, dtype=info.dtype)
    return torch.frombuffer(buf, dtype=info.dtype).view(info.shape)


def plan_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[bytes, list[str]]:
    """The serialized header for tensors written in the returned order (widest dtype first, so aligned)."""
    order = sorted(entries, key=lambda e: (-e[1].itemsize, e[0]))
    header: dict[str, Any] = {}
    offset = 0
    for name, dtype, shape in order:
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    return struct.pack("<Q", len(raw)) + raw, [e[0] for e in order]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


class StreamWriter:
    """Write a safetensors file tensor by tensor into an open file, hashing everything written."""

    def __init__(self, f: IO[bytes], entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0
        header, self.order = plan_header(entries)
        self.expected = {name: (dtype, shape) for name, dtype, shape in entries}
        self._write(header)

    def _write(self, data: bytes | memoryview) -> None:
        self.f.write(data)
        self.sha.update(data)
        self.size += len(data)

    def write_all(self, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
        """Write tensors given in `self.order`."""
        for expected_name, (name, t) in zip(self.order, tensors, strict=True):
            dtype, shape = self.expected[expected_name]
            if name != expected_name or t.dtype != dtype or tuple(t.shape) != shape:
                raise ValueError(
                    f"tensor {name!r} ({t.dtype}, {list(t.shape)}) does not match the planned "
                    f"{expected_name!r} ({dtype}, {list(shape)})"
                )
            self._write(tensor_bytes(t))
