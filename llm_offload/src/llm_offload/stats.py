"""Per-layer timings of an offloaded run: compute, transfer, stall.

Timestamps come from the device backend: plain `perf_counter` floats on CPU, CUDA events on the GPU (resolved
lazily, when the stats are read, so that the forward never waits on the device to measure it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LayerStats:
    """What one offloaded module cost, summed over its calls since the last `reset_stats()`."""

    compute_s: float = 0.0  # time inside the module's forward
    transfer_s: float = 0.0  # time its weights took to arrive (read + copy), overlapped or not
    stall_s: float = 0.0  # time the forward waited for its weights: the part of the transfer not hidden
    calls: int = 0
    loads: int = 0  # how many times its weights were fetched
    bytes: int = 0  # bytes fetched
    resident: bool = False  # pinned on the device, never streamed

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class OffloadStats:
    """Stats of every offloaded module, in execution order, and their totals."""

    layers: list[LayerStats] = field(default_factory=list)
    peak_resident_bytes: int = 0  # most bytes of streamed weights held at once

    @property
    def compute_s(self) -> float:
        return sum(s.compute_s for s in self.layers)

    @property
    def transfer_s(self) -> float:
        return sum(s.transfer_s for s in self.layers)

    @property
    def stall_s(self) -> float:
        return sum(s.stall_s for s in self.layers)

    @property
    def loads(self) -> int:
        return sum(s.loads for s in self.layers)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.layers)

    @property
    def overlap(self) -> float:
        """Share of the transfer time hidden behind compute (1.0: no stall at all)."""
        if self.transfer_s <= 0:
            return 1.0
        return max(0.0, 1.0 - self.stall_s / self.transfer_s)

    def as_dict(self) -> dict[str, Any]:
        return {
            "compute_s": self.compute_s,
            "transfer_s": self.transfer_s,
            "stall_s": self.stall_s,
            "loads": self.loads,
            "bytes": self.bytes,
            "overlap": self.overlap,
            "peak_resident_bytes": self.peak_resident_bytes,
            "layers": [s.as_dict() for s in self.layers],
        }

    def __str__(self) -> str:
        rows = [f"{'layer':>5} {'compute ms':>10} {'transfer ms':>11} {'stall ms':>9} {'loads':>5}"]
        for i, s in enumerate(self.layers):
            tag = " (resident)" if s.resident else ""
            rows.append(
                f"{i:>5} {s.compute_s * 1e3:>10.2f} {s.transfer_s * 1e3:>11.2f} {s.stall_s * 1e3:>9.2f} {s.loads:>5}{tag}"
            )
        rows.append(
            f"{'total':>5} {self.compute_s * 1e3:>10.2f} {self.transfer_s * 1e3:>11.2f} "
            f"{self.stall_s * 1e3:>9.2f} {self.loads:>5}  overlap {self.overlap:.0%}"
        )
        return "\n".join(rows)


# A pending measurement: resolved to seconds once its marks are known to be complete.
_Pending = tuple[int, str, Callable[[], float | None]]


class StatsRecorder:
    """Collects measurements from the compute thread and the reader threads (hence the lock)."""

    def __init__(self, n_layers: int, resident: set[int]) -> None:
        self._lock = threading.Lock()
        self._n = n_layers
        self._resident = resident
        self._pending: list[_Pending] = []
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._stats = OffloadStats([LayerStats(resident=i in self._resident) for i in range(self._n)])
            self._pending = []

    def add(self, layer: int, what: str, seconds: float) -> None:
        with self._lock:
            s = self._stats.layers[layer]
            setattr(s, what, getattr(s, what) + seconds)

    def add_later(self, layer: int, what: str, resolve: Callable[[], float | None]) -> None:
        """`resolve()` returns seconds once the device has passed the marks, None before."""
        with self._lock:
            self._pending.append((layer, what, resolve))
            if len(self._pending) > 4096:
                self._resolve_locked(block=False)

    def count(self, layer: int, *, calls: int = 0, loads: int = 0, nbytes: int = 0) -> None:
        with self._lock:
            s = self._stats.layers[layer]
            s.calls += calls
            s.loads += loads
            s.bytes += nbytes

    def peak(self, resident_bytes: int) -> None:
        with self._lock:
            self._stats.peak_resident_bytes = max(self._stats.peak_resident_bytes, resident_bytes)

    def _resolve_locked(self, *, block: bool) -> None:
        still = []
        for layer, what, resolve in self._pending:
            seconds = resolve()
            if seconds is None and block:
                raise AssertionError("a blocking resolver returned None")
            if seconds is None:
                still.append((layer, what, resolve))
            else:
                s = self._stats.layers[layer]
                setattr(s, what, getattr(s, what) + seconds)
        self._pending = still

    def snapshot(self, wait: Callable[[], None] | None = None) -> OffloadStats:
        """The stats so far; `wait()` (the backend's) first makes every pending mark complete."""
        if wait is not None and self._pending:
            wait()
        with self._lock:
            self._resolve_locked(block=False)
            return OffloadStats(
                [LayerStats(**s.as_dict()) for s in self._stats.layers], self._stats.peak_resident_bytes
            )
