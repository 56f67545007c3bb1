"""A backend that behaves like CudaBackend but runs on the CPU, for testing the scheduling logic.

Slots are preallocated buffers filled with garbage; uploads are *deferred* like copies on a stream: they land
in the slot only when the compute waits for them (`acquire`), or when a later upload / staging reuse forces
stream order. So a scheduler that forgot to acquire, released a slot too early, or reused a staging buffer
before its copy computes on garbage, and the parity tests fail. Every call is logged and checked.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch

from llm_offload.backend import LayerLayout, packed_offsets, slot_view


class FakeDeviceBackend:
    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.log: list[tuple[str, int]] = []
        self.violations: list[str] = []
        self.allocations = 0
        self._lock = threading.Lock()
        self._clock = 0.0

    def allocate(self, n_slots: int, slot_bytes: int) -> None:
        self.allocations += 1
        self.slot_bytes = slot_bytes
        self.slots = [torch.full((slot_bytes,), 0x7F, dtype=torch.uint8) for _ in range(n_slots)]
        self.staging_bufs = [torch.full((slot_bytes,), 0x7F, dtype=torch.uint8) for _ in range(n_slots)]
        self.pending: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.state = ["free"] * n_slots  # free -> uploaded -> in_use -> released -> uploaded ...

    def _note(self, what: str, slot: int) -> None:
        with self._lock:
            self.log.append((what, slot))

    def _flush(self, slot: int) -> None:
        for dst, src in self.pending.pop(slot, []):
            dst.copy_(src)

    def staging(self, slot: int, *, reads_into: bool, zero_copy: bool) -> torch.Tensor | None:
        if not reads_into:
            return None
        self._flush(slot)  # the copy out of this staging buffer must be done before it is refilled
        self.staging_bufs[slot].fill_(0x7F)
        return self.staging_bufs[slot]

    def upload(
        self, slot: int, host: Mapping[str, torch.Tensor], layout: LayerLayout
    ) -> dict[str, torch.Tensor]:
        self._note("upload", slot)
        if self.state[slot] == "in_use":
            self.violations.append(f"upload into slot {slot} while the compute uses it")
        self._flush(slot)  # stream order: an earlier copy into the slot lands first
        self.slots[slot].fill_(0x7F)
        dst = self.slots[slot]
        packed = packed_offsets(host, self.staging_bufs[slot])
        copies, out = [], {}
        for spec in layout.tensors:
            t = host[spec.name]
            off = packed[spec.name] if packed is not None else spec.offset
            view = slot_view(dst, off, tuple(t.shape), t.dtype)
            copies.append((view, t))
            out[spec.name] = view
        self.pending[slot] = copies
        self.state[slot] = "uploaded"
        return out

    def acquire(self, slot: int) -> None:
        self._note("acquire", slot)
        if self.state[slot] not in ("uploaded", "released"):
            self.violations.append(f"acquire of slot {slot} in state {self.state[slot]}")
        self._flush(slot)
        self.state[slot] = "in_use"

    def release(self, slot: int) -> None:
        self._note("release", slot)
        if self.state[slot] != "in_use":
            self.violations.append(f"release of slot {slot} in state {self.state[slot]}")
        self.state[slot] = "released"

    def mark(self) -> float:
        with self._lock:
            self._clock += 1.0
            return self._clock

    def elapsed(self, start: Any, end: Any) -> float | None:
        return float(end - start)

    def upload_time(self, slot: int) -> Callable[[], float | None] | None:
        return lambda: 0.5

    def wait_all(self) -> None:
        pass

    def close(self) -> None:
        self.slots = []
