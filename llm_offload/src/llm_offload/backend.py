"""What the scheduler asks of a device: slots to load layers into, uploads, and ordering marks.

The scheduler (scheduler.py) and the hooks (offload.py) are written against `Backend` only, so the same code
runs with `CpuBackend` (cpu.py), `CudaBackend` (cuda.py) and the fake backend of the tests.

Threads: `staging` and `upload` run on a reader thread; `acquire`, `release` and `mark` on the thread that
runs the model's forward. A slot is handed to a reader only after the scheduler has released it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

ALIGN = 256  # bytes; device views into a slot start on this boundary (CUDA's allocation alignment)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # bytes from the start of the slot

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


@dataclass(frozen=True)
class LayerLayout:
    """The tensors one module needs, packed into a slot at aligned offsets."""

    tensors: tuple[TensorSpec, ...]
    nbytes: int

    @classmethod
    def pack(cls, shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> LayerLayout:
        specs, offset = [], 0
        for name, (shape, dtype) in shapes.items():
            spec = TensorSpec(name, tuple(shape), dtype, offset)
            specs.append(spec)
            offset += -(-spec.nbytes // ALIGN) * ALIGN
        return cls(tuple(specs), offset)

    @property
    def data_bytes(self) -> int:
        """Bytes of the tensors themselves, without alignment padding."""
        return sum(t.nbytes for t in self.tensors)


def slot_view(buffer: torch.Tensor, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A typed view into a flat uint8 buffer, without copying."""
    n = 1
    for d in shape:
        n *= d
    return buffer[offset : offset + n * dtype.itemsize].view(dtype).view(shape)


def packed_offsets(host: Mapping[str, torch.Tensor], staging: torch.Tensor) -> dict[str, int] | None:
    """Byte offsets of the host tensors inside `staging` when all are contiguous views of it, else None."""
    base, end = staging.data_ptr(), staging.data_ptr() + staging.numel()
    offsets = {}
    for name, t in host.items():
        ptr = t.data_ptr()
        if t.device.type != "cpu" or not t.is_contiguous() or not base <= ptr <= end - t.nbytes:
            return None
        offsets[name] = ptr - base
    return offsets


class Backend(Protocol):
    device: torch.device

    def allocate(self, n_slots: int, slot_bytes: int) -> None:
        """Reserve `n_slots` slots of `slot_bytes` each (once, before any upload)."""

    def staging(self, slot: int, *, reads_into: bool, zero_copy: bool) -> torch.Tensor | None:
        """Reader thread: a host buffer the source should read the slot's next layer into, or None."""

    def upload(
        self, slot: int, host: Mapping[str, torch.Tensor], layout: LayerLayout
    ) -> dict[str, torch.Tensor]:
        """Reader thread: start moving a layer's host tensors into the slot; device tensors by name."""

    def acquire(self, slot: int) -> None:
        """Compute thread: make the compute wait until the slot's upload is complete."""

    def release(self, slot: int) -> None:
        """Compute thread: the compute issued so far is the last to read the slot's current layer."""

    def mark(self) -> Any:
        """Compute thread: a point on the compute timeline (a float, or a CUDA event)."""

    def elapsed(self, start: Any, end: Any) -> float | None:
        """Seconds from `start` to `end`, or None while the device has not passed `end`."""

    def upload_time(self, slot: int) -> Callable[[], float | None] | None:
        """A resolver of the device time the slot's last upload took, when the device measures it."""

    def wait_all(self) -> None:
        """Wait until every mark and upload issued so far is complete (used when reading stats)."""

    def close(self) -> None:
        """Free the slots and staging buffers."""
