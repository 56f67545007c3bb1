"""Write a safetensors file as a stream: the header up front, then the tensors one at a time, hashed as written.

Converting a model this way never holds more than one tensor in memory.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from typing import IO, Any

import torch

from llm_sepweight.safetensors_file import DTYPE_NAMES

DATA_ALIGN = 64  # bytes: a cache line, the widest SIMD load


def plan_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[bytes, list[str]]:
    """The serialized header for tensors written in the returned order.

    The data starts on a `DATA_ALIGN` boundary of the file and tensors go widest dtype first, those whose
    size is a multiple of `DATA_ALIGN` before the others: a memory map of the file then hands out tensors at
    the same alignment as the allocator's. Some CPU kernels (MKL's gemv) sum in another order on
    misaligned data, so a layer used in place would give other low bits than the same layer loaded."""
    order = sorted(entries, key=lambda e: (-e[1].itemsize, _nbytes(e[1], e[2]) % DATA_ALIGN != 0, e[0]))
    header: dict[str, Any] = {}
    offset = 0
    for name, dtype, shape in order:
        nbytes = _nbytes(dtype, shape)
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % DATA_ALIGN)  # JSON allows the trailing spaces
    return struct.pack("<Q", len(raw)) + raw, [e[0] for e in order]


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


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
