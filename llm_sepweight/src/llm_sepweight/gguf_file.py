"""A small GGUF reader: metadata and tensor infos parsed directly (fast on 262k-token vocabularies), tensor
bytes as numpy views of one memory map. Dequantization stays with the `gguf` package.

Every count and length read from the file is checked against the bytes left before anything is allocated
or looped over (a string of n bytes needs n bytes, an array of n items at least n times its smallest
item), arrays nest at most `MAX_NESTING` deep and hold at most `MAX_ARRAY_ITEMS` items, and the alignment
must be a power of two. Any violation is a `GGUFFormatError` (a `ValueError`) naming the file and field.
"""

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
_STRING, _ARRAY = 8, 9
MAX_ARRAY_ITEMS = 1 << 24  # a 262k vocabulary is 2^18; nothing real comes near
MAX_NESTING = 4  # arrays of arrays of ...
MAX_KEY_BYTES = 65535  # the GGUF spec's limit on a key
MAX_DIMS = 8  # ggml has 4
MAX_ALIGNMENT = 1 << 20
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, the smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset


class GGUFFormatError(ValueError):
    """A file that is not GGUF, is truncated, or holds counts, lengths or offsets that cannot be right."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # GGUF order (fastest dimension first), as llama.cpp writes it
    type_id: int  # a ggml quantization type
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = f.seek(0, 2)
            if size < 4:
                raise GGUFFormatError(f"{self.path}: not a GGUF file ({size} bytes)")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._pos = 0
        try:
            self._parse()
        except struct.error:
            self._map.close()
            raise GGUFFormatError(f"{self.path}: truncated GGUF file (ends inside the header)") from None
        except BaseException:
            self._map.close()
            raise

    # --- primitives --------------------------------------------------------------------------------------

    def _fail(self, what: str) -> GGUFFormatError:
        return GGUFFormatError(f"{self.path}: {what}")

    def _left(self) -> int:
        return len(self._map) - self._pos

    def _read(self, fmt: str) -> Any:
        value = struct.unpack_from("<" + fmt, self._map, self._pos)
        self._pos += struct.calcsize("<" + fmt)
        return value[0]

    def _count(self, n: int, item_bytes: int, field: str) -> int:
        """`n` if `n` items of at least `item_bytes` bytes each fit in what is left of the file."""
        if n * item_bytes > self._left():
            raise self._fail(
                f"{field}: {n} items cannot fit in the {self._left()} bytes left (truncated or corrupt)"
            )
        return n

    def _string(self, field: str, limit: int | None = None) -> str:
        n = self._read("Q")
        if limit is not None and n > limit:
            raise self._fail(f"{field}: string of {n} bytes exceeds the {limit}-byte limit")
        self._count(n, 1, field)
        raw = self._map[self._pos : self._pos + n]
        self._pos += n
        return raw.decode("utf-8", errors="replace")

    def _value(self, type_id: int, field: str, depth: int = 0) -> Any:
        if type_id in _SCALARS:
            return self._read(_SCALARS[type_id])
        if type_id == _STRING:
            return self._string(field)
        if type_id == _ARRAY:
            return self._array(field, depth)
        raise self._fail(f"{field}: unknown GGUF metadata value type {type_id} at byte {self._pos}")

    def _array(self, field: str, depth: int) -> list[Any]:
        if depth >= MAX_NESTING:
            raise self._fail(f"{field}: arrays nested more than {MAX_NESTING} deep")
        item_type, count = self._read("I"), self._read("Q")
        if count > MAX_ARRAY_ITEMS:
            raise self._fail(f"{field}: array of {count} items exceeds the {MAX_ARRAY_ITEMS}-item limit")
        if item_type in _NUMPY:
            dtype = np.dtype(_NUMPY[item_type]).newbyteorder("<")
            self._count(count, dtype.itemsize, field)
            arr = np.frombuffer(self._map, dtype=dtype, count=count, offset=self._pos)
            self._pos += count * dtype.itemsize
            return list(arr.tolist())
        if item_type not in (_STRING, _ARRAY):
            raise self._fail(f"{field}: unknown GGUF array item type {item_type} at byte {self._pos}")
        self._count(count, 8 if item_type == _STRING else 12, field)
        return [self._value(item_type, field, depth + 1) for _ in range(count)]

    # --- the header -------------------------------------------------------------------------------------

    def _parse(self) -> None:
        if self._map[:4] != _MAGIC:
            raise self._fail(f"not a GGUF file (magic {bytes(self._map[:4])!r}, expected b'GGUF')")
        self._pos = 4
        version = self._read("I")
        if version not in (2, 3):
            raise self._fail(f"GGUF version {version}; expected 2 or 3")
        n_tensors, n_kv = self._read("Q"), self._read("Q")
        self._count(n_kv, _MIN_KV_BYTES, "metadata count")
        self._count(n_tensors, _MIN_TENSOR_INFO_BYTES, "tensor count")
        self.metadata: dict[str, Any] = {}
        for index in range(n_kv):
            key = self._string(f"metadata key #{index}", MAX_KEY_BYTES)
            if key in self.metadata:
                raise self._fail(f"metadata key {key!r} appears twice")
            self.metadata[key] = self._value(self._read("I"), f"metadata {key!r}")
        infos = [self._tensor_info(index) for index in range(n_tensors)]
        alignment = self._alignment()
        data_start = -(-self._pos // alignment) * alignment
        self.tensors: list[GGUFTensor] = []
        seen: set[str] = set()
        for name, shape, type_id, offset in infos:
            if name in seen:
                raise self._fail(f"tensor {name!r} appears twice")
            seen.add(name)
            self.tensors.append(self._place(name, shape, type_id, offset, data_start, alignment))

    def _tensor_info(self, index: int) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string(f"tensor #{index} name", MAX_KEY_BYTES)
        n_dims = self._read("I")
        if n_dims > MAX_DIMS:
            raise self._fail(f"tensor {name!r}: {n_dims} dimensions (at most {MAX_DIMS})")
        shape = tuple(self._read("Q") for _ in range(n_dims))
        return name, shape, self._read("I"), self._read("Q")

    def _alignment(self) -> int:
        alignment = self.metadata.get("general.alignment", 32)
        if (
            isinstance(alignment, bool)
            or not isinstance(alignment, int)
            or not 0 < alignment <= MAX_ALIGNMENT
            or alignment & (alignment - 1)
        ):
            raise self._fail(f"metadata 'general.alignment' is {alignment!r}; expected a power of two")
        return alignment

    def _place(
        self, name: str, shape: tuple[int, ...], type_id: int, offset: int, data_start: int, alignment: int
    ) -> GGUFTensor:
        if offset % alignment:
            raise self._fail(
                f"tensor {name!r}: offset {offset} is not a multiple of the alignment {alignment}"
            )
        start = data_start + offset
        if start > len(self._map):
            raise self._fail(f"truncated: tensor {name!r} starts past the end of the file")
        nbytes = _nbytes(shape, type_id)
        if nbytes is not None and start + nbytes > len(self._map):
            raise self._fail(f"truncated: tensor {name!r} ends past the end of the file")
        if nbytes is None and _known_block(type_id) is not None:
            raise self._fail(
                f"tensor {name!r}: shape {list(shape)} is not a whole number of quantization blocks"
            )
        return GGUFTensor(name, shape, type_id, start, nbytes or 0)

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


def _known_block(type_id: int) -> tuple[int, int] | None:
    """(block size, bytes per block) of a ggml type the `gguf` package knows, else None."""
    try:
        import gguf

        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
    except (ImportError, ValueError, KeyError):
        return None
    return int(block), int(type_size)


def _nbytes(shape: tuple[int, ...], type_id: int) -> int | None:
    """Bytes of a tensor; None for an unknown type or a row that is not a whole number of blocks."""
    sizes = _known_block(type_id)
    if sizes is None:
        return None
    block, type_size = sizes
    if shape and shape[0] % block:
        return None
    n = 1
    for d in shape:
        n *= d
    return n // block * type_size
