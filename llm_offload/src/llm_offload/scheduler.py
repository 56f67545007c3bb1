"""Which layer sits in which slot, and what is being fetched: the prefetch window in execution order.

Only the compute thread calls `acquire`/`release`; reader threads only run `fetch(layer, slot)`. A slot is
free when no layer is assigned to it and no fetch into it is still running: a prefetch that is no longer
wanted is cancelled, or, if it already runs, left to finish ("draining") before its slot is reused.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


class OffloadError(RuntimeError):
    """A layer's weights could not be made ready; `layer` is its position in the offloaded modules."""

    def __init__(self, message: str, layer: int | None = None) -> None:
        super().__init__(message)
        self.layer = layer


@dataclass
class _Slot:
    layer: int | None = None  # the layer held or being fetched; None when free or draining
    future: cf.Future[Any] | None = None
    users: int = 0  # forwards of `layer` running now


class Scheduler:
    """Fetch `order` (streamed layers, execution order, cyclic) into `n_slots` slots, `depth` ahead."""

    def __init__(
        self,
        order: Sequence[int],
        fetch: Callable[[int, int], Any],
        *,
        n_slots: int,
        depth: int,
        layer_bytes: Callable[[int], int],
        threads: int = 1,
        cyclic: bool = True,
        describe: Callable[[int], str] = lambda i: f"layer {i}",
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        if n_slots < 1:
            raise ValueError("n_slots must be at least 1")
        self.order = list(order)
        self._pos = {layer: p for p, layer in enumerate(self.order)}
        self._fetch = fetch
        self.slots = [_Slot() for _ in range(n_slots)]
        self.depth = min(depth, n_slots - 1)
        self._layer_bytes = layer_bytes
        self._cyclic = cyclic
        self._describe = describe
        self._on_bytes = on_bytes
        self._threads = threads
        self._pool: cf.ThreadPoolExecutor | None = None
        self._lock = threading.RLock()
        self.hold = False  # block schedule: keep a layer after its forward until another layer is acquired

    # -- the window -------------------------------------------------------------------------------------

    def window(self, layer: int) -> list[int]:
        """`layer` and the layers to fetch ahead of it."""
        p = self._pos[layer]
        n = len(self.order)
        ahead = range(p + 1, p + 1 + min(self.depth, n - 1))
        return [layer] + [self.order[q % n] for q in ahead if self._cyclic or q < n]

    def after(self, layer: int) -> int | None:
        """The layer fetched after `layer`'s window, to hint at (None past the end when not cyclic)."""
        q = self._pos[layer] + 1
        if q >= len(self.order) and not self._cyclic:
            return None
        return self.order[q % len(self.order)]

    def slot_of(self, layer: int) -> int | None:
        for s, slot in enumerate(self.slots):
            if slot.layer == layer:
                return s
        return None

    @property
    def resident_bytes(self) -> int:
        return sum(self._layer_bytes(s.layer) for s in self.slots if s.layer is not None)

    # -- compute thread ---------------------------------------------------------------------------------

    def acquire(self, layer: int) -> tuple[int, Any]:
        """Wait until `layer` is ready (fetching it now if nothing did), start fetching the layers after it."""
        if layer not in self._pos:
            raise OffloadError(f"{self._describe(layer)} is not streamed by this scheduler", layer)
        with self._lock:
            window = self.window(layer)
            for slot in self.slots:
                if slot.layer is not None and slot.layer not in window and slot.users == 0:
                    self._drop(slot)
            s = self.slot_of(layer)
            if s is None:
                s = self._free_slot(wait=True)
                assert s is not None
                self._submit(layer, s)
            for ahead in window[1:]:
                if self.slot_of(ahead) is None:
                    free = self._free_slot(wait=False)
                    if free is None:
                        break
                    self._submit(ahead, free)
            slot = self.slots[s]
            future = slot.future
        assert future is not None
        try:
            result = future.result()
        except BaseException as e:
            self.reset()
            raise OffloadError(f"{self._describe(layer)}: {type(e).__name__}: {e}", layer) from e
        with self._lock:
            slot.users += 1
        return s, result

    def release(self, layer: int) -> int | None:
        """The forward of `layer` is done; its slot is freed unless another forward or `hold` keeps it."""
        with self._lock:
            s = self.slot_of(layer)
            if s is None:
                return None
            slot = self.slots[s]
            slot.users = max(0, slot.users - 1)
            if slot.users == 0 and not self.hold:
                self._drop(slot)
            return s

    def evict(self) -> None:
        """Drop every layer no forward is using (prefetched ones too)."""
        with self._lock:
            for slot in self.slots:
                if slot.layer is not None and slot.users == 0:
                    self._drop(slot)

    def reset(self) -> None:
        """Forget everything: cancel or wait out every fetch, free every slot. Used after errors."""
        with self._lock:
            futures = [s.future for s in self.slots if s.future is not None]
            for f in futures:
                f.cancel()
            cf.wait(futures)
            for slot in self.slots:
                slot.layer, slot.future, slot.users = None, None, 0
            self._report_bytes()

    def close(self) -> None:
        self.reset()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # -- internals (lock held) --------------------------------------------------------------------------

    def _submit(self, layer: int, s: int) -> None:
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(self._threads, thread_name_prefix="llm_offload-reader")
        slot = self.slots[s]
        slot.layer, slot.users = layer, 0
        slot.future = self._pool.submit(self._fetch, layer, s)
        self._report_bytes()

    def _drop(self, slot: _Slot) -> None:
        slot.layer = None
        if slot.future is not None and slot.future.cancel():
            slot.future = None
        self._report_bytes()

    def _free_slot(self, *, wait: bool) -> int | None:
        while True:
            draining = []
            for s, slot in enumerate(self.slots):
                if slot.layer is None:
                    if slot.future is None or slot.future.done():
                        slot.future = None
                        return s
                    draining.append(slot.future)
            if not wait:
                return None
            if not draining:
                busy = [self._describe(x.layer) for x in self.slots if x.layer is not None]
                raise OffloadError(
                    f"no free slot: all {len(self.slots)} are in use by {', '.join(busy)}; raise "
                    "max_resident_bytes, or do not call offloaded layers from inside each other"
                )
            cf.wait(draining, return_when=cf.FIRST_COMPLETED)

    def _report_bytes(self) -> None:
        if self._on_bytes is not None:
            self._on_bytes(self.resident_bytes)
