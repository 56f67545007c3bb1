"""The CUDA backend: a dedicated copy stream, preallocated device slots, reused pinned staging buffers.

- Device slots are allocated once (one flat uint8 buffer per slot, sized to the largest layer) and every
  layer's tensors are views into its slot: no allocation, no `empty_cache`, in the loop.
- Copies run on `copy_stream`. Before writing a slot, the copy stream waits for the event the compute
  stream recorded after the slot's previous layer ran (`release`); the compute stream waits for the event
  recorded after the copy (`acquire`). Nothing waits on the whole device.
- Sources that read files (`SepweightSource`) read straight into a pinned staging buffer per slot, then the
  whole layer goes up in one `copy_`. The reader thread waits (on an event, not the device) until the
  previous copy out of that staging buffer is done before reusing it. Sources already in pinned memory
  (`CpuSource`) are copied from directly, one `copy_` per tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .backend import LayerLayout, packed_offsets, slot_view


class CudaBackend:
    def __init__(self, device: torch.device | str = "cuda") -> None:
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"CudaBackend needs a CUDA device, got {self.device}")
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available: offload to 'cpu' instead")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.copy_stream = torch.cuda.Stream(self.device)
        self._slots: list[torch.Tensor] = []
        self._staging: list[torch.Tensor | None] = []
        self._slot_bytes = 0
        self._released: list[torch.cuda.Event | None] = []  # compute done with the slot's last layer
        self._copied: list[torch.cuda.Event | None] = []  # copy into the slot (and out of its staging) done
        self._copy_started: list[torch.cuda.Event | None] = []

    def allocate(self, n_slots: int, slot_bytes: int) -> None:
        self._slot_bytes = slot_bytes
        self._slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(n_slots)]
        self._staging = [None] * n_slots  # pinned on first use: only file-reading sources need them
        self._released = [None] * n_slots
        self._copied = [None] * n_slots
        self._copy_started = [None] * n_slots

    def staging(self, slot: int, *, reads_into: bool, zero_copy: bool) -> torch.Tensor | None:
        if not reads_into:
            return None
        copied = self._copied[slot]
        if copied is not None:
            copied.synchronize()  # this reader thread waits for the last copy out of the buffer, nothing else
        buf = self._staging[slot]
        if buf is None:
            buf = self._staging[slot] = torch.empty(self._slot_bytes, dtype=torch.uint8, pin_memory=True)
        return buf

    def upload(
        self, slot: int, host: Mapping[str, torch.Tensor], layout: LayerLayout
    ) -> dict[str, torch.Tensor]:
        dst = self._slots[slot]
        staging = self._staging[slot]
        packed = packed_offsets(host, staging) if staging is not None else None
        stream = self.copy_stream
        started = torch.cuda.Event(enable_timing=True)
        copied = torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            released = self._released[slot]
            if released is not None:
                stream.wait_event(released)
            started.record(stream)
            if packed is not None and staging is not None:
                # The file's tensors are contiguous in staging: one copy, device views at the same offsets.
                lo = min(packed.values())
                hi = max(packed[n] + t.nbytes for n, t in host.items())
                dst[lo:hi].copy_(staging[lo:hi], non_blocking=True)
                out = {n: slot_view(dst, packed[n], tuple(t.shape), t.dtype) for n, t in host.items()}
            else:
                out = {}
                for spec in layout.tensors:
                    view = slot_view(dst, spec.offset, spec.shape, spec.dtype)
                    view.copy_(host[spec.name], non_blocking=True)
                    out[spec.name] = view
            copied.record(stream)
        self._copy_started[slot], self._copied[slot] = started, copied
        return out

    def acquire(self, slot: int) -> None:
        copied = self._copied[slot]
        if copied is not None:
            torch.cuda.current_stream(self.device).wait_event(copied)

    def release(self, slot: int) -> None:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._released[slot] = event

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def elapsed(self, start: Any, end: Any) -> float | None:
        if not (start.query() and end.query()):
            return None
        return max(0.0, start.elapsed_time(end) / 1e3)

    def upload_time(self, slot: int) -> Callable[[], float | None] | None:
        started, copied = self._copy_started[slot], self._copied[slot]
        if started is None or copied is None:
            return None
        return lambda: self.elapsed(started, copied)

    def wait_all(self) -> None:
        # Only when stats are read, outside the forward: wait for the two streams we use, not the device.
        torch.cuda.current_stream(self.device).synchronize()
        self.copy_stream.synchronize()

    def close(self) -> None:
        self.wait_all()
        self._slots, self._staging = [], []
        self._released, self._copied, self._copy_started = [], [], []
