"""A small GGUF reader: metadata and tensor infos parsed directly (fast on 262k-token vocabularies), tensor
bytes as numpy views of one memory map. Dequantization stays with the `gguf` package."""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_MAGIC = b"GGUF"
# GGUF value types -> struct format (scalars); 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}


class GGUFFormatError(ValueError):
    """A file that is not GGUF, or is truncated."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # GGUF order (fastest dimension first), as llama.cpp writes it
    type_id: int  # a ggml quantization type
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._pos = 0
        try:
            self._parse()
        except struct.error:
            raise GGUFFormatError(f"{path}: truncated GGUF file (ends inside the header)") from None

    def _read(self, fmt: str) -> Any:
        value = struct.unpack_from("<" + fmt, self._map, self._pos)
        self._pos += struct.calcsize("<" + fmt)
        return value[0]

    def _string(self) -> str:
        n = self._read("Q")
        raw = self._map[self._pos : self._pos + n]
        if len(raw) != n:
            raise struct.error("truncated string")
        self._pos += n
        return raw.decode("utf-8", errors="replace")

    def _value(self, type_id: int) -> Any:
        if type_id in _SCALARS:
            return self._read(_SCALARS[type_id])
        if type_id == 8:
            return self._string()
        if type_id == 9:
            item_type, count = self._read("I"), self._read("Q")
            if item_type in _NUMPY:
                dtype = np.dtype(_NUMPY[item_type]).newbyteorder("<")
                arr = np.frombuffer(self._map, dtype=dtype, count=count, offset=self._pos)
                self._pos += count * dtype.itemsize
                return arr.tolist()
            return [self._value(item_type) for _ in range(count)]
        raise GGUFFormatError(f"{self.path}: unknown GGUF metadata value type {type_id} at byte {self._pos}")

    def _parse(self) -> None:
        if self._map[:4] != _MAGIC:
            raise GGUFFormatError(
                f"{self.path}: not a GGUF file (magic {bytes(self._map[:4])!r}, expected b'GGUF')"
            )
        self._pos = 4
        version = self._read("I")
        if version not in (2, 3):
            raise GGUFFormatError(f"{self.path}: GGUF version {version}; expected 2 or 3")
        n_tensors, n_kv = self._read("Q"), self._read("Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._read("I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._read("I")
            shape = tuple(self._read("Q") for _ in range(n_dims))
            infos.append((name, shape, self._read("I"), self._read("Q")))
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self._pos // alignment) * alignment
        self.tensors: list[GGUFTensor] = []
        for name, shape, type_id, offset in infos:
            nbytes = _nbytes(shape, type_id)
            start = data_start + offset
            if nbytes is not None and start + nbytes > len(self._map):
                raise GGUFFormatError(
                    f"{self.path}: truncated: tensor {name!r} ends past the end of the file"
                )
            self.tensors.append(GGUFTensor(name, shape, type_id, start, nbytes or 0))

    def raw(self, t: GGUFTensor) -> np.ndarray:
        """The tensor's bytes shaped as the `gguf` package's reader shapes them (rows of blocks, or plain floats)."""
        import gguf

        qtype = gguf.GGMLQuantizationType(t.type_id)
        rows = tuple(reversed(t.shape))
        if qtype.name in ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"):
            dtype = {
                "F32": np.float32,
                "F16": np.float16,
                "F64": np.float64,
                "I8": np.int8,
                "I16": np.int16,
                "I32": np.int32,
                "I64": np.int64,
                "BF16": np.uint16,
            }[qtype.name]
            return np.frombuffer(
                self._map, dtype=dtype, count=t.nbytes // np.dtype(dtype).itemsize, offset=t.offset
            ).reshape(rows)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        byte_rows = (*rows[:-1], rows[-1] // block * type_size)
        return np.frombuffer(self._map, dtype=np.uint8, count=t.nbytes, offset=t.offset).reshape(byte_rows)


def _nbytes(shape: tuple[int, ...], type_id: int) -> int | None:
    try:
        import gguf

        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
    except (ImportError, ValueError, KeyError):
        return None
    n = 1
    for d in shape:
        n *= d
    return n // block * type_size
