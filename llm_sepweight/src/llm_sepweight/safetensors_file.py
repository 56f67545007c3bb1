"""The one validating safetensors reader of the repository: headers checked as strictly as `safetensors` does.

A file is an 8-byte little-endian header length `n`, `n` bytes of JSON, then the data buffer. The header is
accepted only when: `n` is at most 100 MB (safetensors' cap) and fits in the file; the JSON is UTF-8, starts
with `{`, nests at most `MAX_JSON_DEPTH` deep and has no duplicate keys; every entry is an object with a
known `dtype`, a `shape` of non-negative ints and `data_offsets` `[begin, end]` of two ints whose span is the
shape's byte count; the spans tile the data buffer from byte 0 to its end, with no gap, no overlap and no
trailing byte; `__metadata__` is absent, null or an object of str -> str. Anything else is a
`SafetensorsError` (a `ValueError`) naming the file and, where there is one, the tensor.

`Header.read(path)` reads only the header (names, dtypes, shapes, absolute byte ranges within the file),
without mapping. `SafetensorsFile(path)` also maps the file once (private, copy-on-write) and gives
zero-copy CPU tensors over the map; it holds the file open and checks the file's size against the header at
open and again before each tensor is made, so a file truncated after opening is an error, never a SIGBUS
(a tensor already handed out still reads the map: truncating a file that tensors view is the one thing
a memory map cannot survive; copy the tensor (`.clone()`) when the files may change under you).
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
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

MAX_HEADER_BYTES = 100_000_000  # safetensors' own cap on the JSON header
MAX_JSON_DEPTH = 8  # a valid header nests 3 deep (object -> entry -> shape)
_MAX_HEADER = MAX_HEADER_BYTES  # the name of earlier versions
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


class SafetensorsError(ValueError):
    """A safetensors file that is truncated, corrupted, not safetensors at all, or breaks the format's rules."""


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

    @property
    def dtype_name(self) -> str:
        """The safetensors name of the dtype ("F32", "BF16", ...)."""
        return DTYPE_NAMES[self.dtype]


@dataclass(frozen=True)
class Header:
    """A validated header: tensors in file order with absolute byte ranges, and the metadata."""

    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int  # 8 + header length: where the data buffer begins
    file_size: int  # the exact size the header accounts for

    @classmethod
    def read(cls, path: str | Path) -> Header:
        """Read and validate the header of the file `path` (nothing is mapped)."""
        with open(path, "rb") as f:
            return read_header_from(f, str(path))


def read_header_from(f: IO[bytes], where: str) -> Header:
    """Validate the header of the open file `f` against its current size (`where` names it in errors)."""
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    head = f.read(8)
    n = _header_length(head, size, where)
    raw = f.read(n)
    if len(raw) != n:
        raise SafetensorsError(f"{where}: truncated while reading its {n}-byte header")
    return parse_header(head + raw, size, where=where)


def parse_header(data: bytes, file_size: int, *, where: str = "<bytes>") -> Header:
    """Validate the header held at the start of `data` for a file of `file_size` bytes.

    `data` needs only the first 8 + n bytes (the whole file also works): for fuzzing and for readers that
    already hold the bytes.
    """
    n = _header_length(data[:8], file_size, where)
    if len(data) < 8 + n:
        raise SafetensorsError(f"{where}: truncated: the header needs {8 + n} bytes, got {len(data)}")
    header = _parse_json(data[8 : 8 + n], where)
    metadata = _metadata(header.pop("__metadata__", None), where)
    base = 8 + n
    infos = [_entry(name, entry, base, where) for name, entry in header.items()]
    infos.sort(key=lambda i: (i.start, i.stop, i.name))
    _check_tiling(infos, base, file_size, where)
    return Header(where, {i.name: i for i in infos}, metadata, base, file_size)


def _header_length(head: bytes, size: int, where: str) -> int:
    if len(head) < 8 or size < 8:
        raise SafetensorsError(f"{where}: truncated safetensors file ({size} bytes, no header)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES:
        raise SafetensorsError(f"{where}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if n > size - 8:
        raise SafetensorsError(f"{where}: header length {n} does not fit in a {size}-byte file")
    return n


def _parse_json(raw: bytes, where: str) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SafetensorsError(f"{where}: corrupted safetensors header (not UTF-8: {e})") from None
    if not text.startswith("{"):
        raise SafetensorsError(f"{where}: corrupted safetensors header (does not start with '{{')")
    depth = _max_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise SafetensorsError(
            f"{where}: corrupted safetensors header (JSON nested {depth} deep, at most {MAX_JSON_DEPTH})"
        )
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (json.JSONDecodeError, ValueError, RecursionError) as e:
        raise SafetensorsError(f"{where}: corrupted safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{where}: corrupted safetensors header (not a JSON object)")
    return header


def _max_depth(raw: bytes) -> int:
    """Deepest nesting of `{`/`[` outside strings, in linear time and bounded memory (numpy, chunked)."""
    codes = np.frombuffer(_STRING.sub(b'""', raw), dtype=np.uint8)
    depth, deepest = 0, 0
    for lo in range(0, len(codes), 1 << 20):
        chunk = codes[lo : lo + (1 << 20)]
        steps = ((chunk == 123) | (chunk == 91)).astype(np.int32) - ((chunk == 125) | (chunk == 93))
        levels = np.cumsum(steps, dtype=np.int64) + depth
        deepest = max(deepest, int(levels.max()))
        depth = int(levels[-1])
    return deepest


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _metadata(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise SafetensorsError(f"{where}: '__metadata__' must be an object of strings, got {value!r:.100}")
    return value


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(name: str, entry: Any, base: int, where: str) -> TensorInfo:
    def bad(why: str) -> SafetensorsError:
        return SafetensorsError(f"{where}: tensor {name!r} has a bad header entry ({why}): {entry!r:.200}")

    if not isinstance(entry, dict):
        raise bad("not an object")
    dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise bad(f"dtype must be one of {sorted(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise bad("shape must be a list of integers")
    if any(d < 0 for d in shape):
        raise bad("negative dimension")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise bad("data_offsets must be [begin, end]")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise bad("data_offsets must satisfy 0 <= begin <= end")
    dtype = DTYPES[dtype_name]
    numel = 1
    for d in shape:
        numel *= d
    if end - begin != numel * dtype.itemsize:
        raise SafetensorsError(
            f"{where}: tensor {name!r} has offsets {begin}-{end} ({end - begin} bytes) for shape "
            f"{list(shape)} of {dtype_name} ({numel * dtype.itemsize} bytes)"
        )
    return TensorInfo(name, dtype, tuple(shape), base + begin, base + end)


def _check_tiling(infos: list[TensorInfo], base: int, size: int, where: str) -> None:
    """Sorted spans must cover the data buffer exactly: no gap, no overlap (aliasing), no trailing bytes."""
    expected = base
    for info in infos:
        if info.start < expected:
            raise SafetensorsError(
                f"{where}: tensor {info.name!r} overlaps the tensor before it (its bytes "
                f"{info.start - base}-{info.stop - base} start before {expected - base})"
            )
        if info.start > expected:
            raise SafetensorsError(
                f"{where}: {info.start - expected} unaccounted bytes before tensor {info.name!r} "
                f"(data offsets {expected - base}-{info.start - base} belong to no tensor)"
            )
        expected = info.stop
    if expected > size:
        last = infos[-1].name
        raise SafetensorsError(
            f"{where}: truncated: tensor {last!r} ends at byte {expected} but the file has {size} bytes"
        )
    if expected < size:
        after = f"after tensor {infos[-1].name!r}" if infos else "after the header"
        raise SafetensorsError(f"{where}: {size - expected} unaccounted trailing bytes {after}")


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor infos (absolute offsets, file order) and the `__metadata__` of a safetensors file."""
    header = Header.read(path)
    return header.tensors, header.metadata


class SafetensorsFile:
    """One safetensors file, validated and mapped once; `tensor(name)` is a zero-copy CPU view.

    The map is private (copy-on-write: writes to a tensor never reach the file) and the file stays open, so
    replacing or deleting the file leaves the map valid; its size is checked against the header before each
    tensor is made.
    """

    def __init__(self, path: str | Path, infos: dict[str, TensorInfo] | None = None) -> None:
        self.path = Path(path)
        self._file = open(self.path, "rb")  # noqa: SIM115 (held open for the life of the map)
        try:
            self.header = read_header_from(self._file, str(self.path))
            self.infos = infos if infos is not None else self.header.tensors
            size = self.header.file_size
            # ACCESS_COPY: writable for torch.frombuffer (no warning), writes never reach the file.
            self._map = mmap.mmap(self._file.fileno(), size, access=mmap.ACCESS_COPY) if size else None
        except BaseException:
            self._file.close()
            raise

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.infos

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    def check_size(self) -> None:
        """Raise `SafetensorsError` if the file no longer has the size its header accounts for."""
        size = os.fstat(self._file.fileno()).st_size
        if size != self.header.file_size:
            raise SafetensorsError(
                f"{self.path}: changed size after it was opened ({self.header.file_size} -> {size} bytes; "
                "truncated or rewritten in place); reopen the checkpoint"
            )

    def tensor(self, info: TensorInfo | str) -> torch.Tensor:
        """A zero-copy CPU tensor over the map (by `TensorInfo` or by name)."""
        if isinstance(info, str):
            info = self._info(info)
        self.check_size()
        if info.nbytes == 0 or self._map is None:
            return torch.empty(info.shape, dtype=info.dtype)
        count = info.nbytes // info.dtype.itemsize
        return torch.frombuffer(self._map, dtype=info.dtype, count=count, offset=info.start).view(info.shape)

    def raw(self, start: int, stop: int) -> torch.Tensor:
        """Bytes [start, stop) of the file as a zero-copy uint8 view."""
        if not 0 <= start <= stop <= self.header.file_size:
            raise SafetensorsError(f"{self.path}: byte range {start}-{stop} is outside the file")
        self.check_size()
        if self._map is None or stop <= start:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self._map, dtype=torch.uint8, count=stop - start, offset=start)

    def advise_willneed(self, start: int = 0, stop: int | None = None) -> None:
        """Ask the kernel to read bytes [start, stop) ahead (the whole file by default)."""
        if self._map is None or not hasattr(mmap, "MADV_WILLNEED"):
            return
        stop = self.header.file_size if stop is None else stop
        page = mmap.PAGESIZE
        lo = start // page * page
        if stop > lo:
            self._map.madvise(mmap.MADV_WILLNEED, lo, min(stop, self.header.file_size) - lo)

    def close(self) -> None:
        """Close the file; tensors already made keep the map alive."""
        self._file.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {name!r} in this file") from None


MappedFile = SafetensorsFile  # the name of earlier versions


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


def __getattr__(name: str) -> Any:
    # the writer moved to safetensors_write; keep `from llm_sepweight.safetensors_file import StreamWriter`
    if name in ("StreamWriter", "plan_header", "tensor_bytes"):
        from llm_sepweight import safetensors_write

        return getattr(safetensors_write, name)
    raise AttributeError(name)
