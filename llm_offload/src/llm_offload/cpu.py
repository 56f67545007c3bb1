"""The CPU backend: weights are used where the source puts them (a memory map, pinned RAM, a read buffer).

Uploading is a no-op; a slot is only a budget unit and, for sources that read files (`mmap=False`), a host
buffer reused from layer to layer so that streaming allocates nothing after the first pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch

from .backend import LayerLayout


class CpuBackend:
    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        if self.device.type != "cpu":
            raise ValueError(f"CpuBackend runs on the CPU, not on {self.device}")
        self._buffers: list[torch.Tensor | None] = []
        self._slot_bytes = 0

    def allocate(self, n_slots: int, slot_bytes: int) -> None:
        self._buffers = [None] * n_slots  # allocated on first use: zero-copy sources never need them
        self._slot_bytes = slot_bytes

    def staging(self, slot: int, *, reads_into: bool, zero_copy: bool) -> torch.Tensor | None:
        if zero_copy or not reads_into:
            return None
        buf = self._buffers[slot]
        if buf is None:
            buf = self._buffers[slot] = torch.empty(self._slot_bytes, dtype=torch.uint8)
        return buf

    def upload(
        self, slot: int, host: Mapping[str, torch.Tensor], layout: LayerLayout
    ) -> dict[str, torch.Tensor]:
        return {name: t if t.device == self.device else t.to(self.device) for name, t in host.items()}

    def acquire(self, slot: int) -> None:
        pass

    def release(self, slot: int) -> None:
        pass

    def mark(self) -> float:
        return time.perf_counter()

    def elapsed(self, start: float, end: float) -> float:
        return end - start

    def upload_time(self, slot: int) -> Callable[[], float | None] | None:
        return None

    def wait_all(self) -> None:
        pass

    def close(self) -> None:
        self._buffers = []
