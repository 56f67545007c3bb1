"""The scheduler alone, with a fake fetch: slot assignment, the prefetch window, budget, draining, reset."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import pytest

from llm_offload.scheduler import OffloadError, Scheduler


class Recorder:
    """A fetch that records (layer, slot) and can be held back or made to fail per layer."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.gates: dict[int, threading.Event] = {}
        self.fail: set[int] = set()
        self.lock = threading.Lock()
        self.occupied: dict[int, int] = {}  # slot -> layer being written, to catch two fetches in one slot

    def __call__(self, layer: int, slot: int) -> str:
        with self.lock:
            assert slot not in self.occupied, f"two fetches into slot {slot}"
            self.occupied[slot] = layer
            self.calls.append((layer, slot))
        try:
            gate = self.gates.get(layer)
            if gate is not None:
                gate.wait(5)
            if layer in self.fail:
                raise OSError(f"cannot read layer {layer}")
            return f"weights {layer}"
        finally:
            with self.lock:
                del self.occupied[slot]


def make(n_layers: int = 6, n_slots: int = 3, depth: int = 2, **kw: object) -> tuple[Scheduler, Recorder]:
    rec = Recorder()
    sched = Scheduler(range(n_layers), rec, n_slots=n_slots, depth=depth, layer_bytes=lambda i: 100, **kw)  # type: ignore[arg-type]
    return sched, rec


def settle(sched: Scheduler) -> None:
    """Wait for the fetches in flight (they run on reader threads)."""
    cf.wait([s.future for s in sched.slots if s.future is not None])


def run_forward(sched: Scheduler, layers: range | list[int]) -> list[str]:
    out = []
    for i in layers:
        _, w = sched.acquire(i)
        out.append(w)
        sched.release(i)
    return out


def test_forward_gets_each_layer_and_prefetches_in_order() -> None:
    sched, rec = make()
    assert run_forward(sched, range(6)) == [f"weights {i}" for i in range(6)]
    settle(sched)
    layers = [layer for layer, _ in rec.calls]
    assert layers[:6] == [0, 1, 2, 3, 4, 5]  # fetched in execution order, each once
    assert layers[6:] == [0, 1]  # cyclic: the next forward's first layers already on their way
    assert sched.resident_bytes <= 3 * 100
    sched.close()


def test_no_cyclic_prefetch_past_the_end() -> None:
    sched, rec = make(cyclic=False)
    run_forward(sched, range(6))
    settle(sched)
    assert [layer for layer, _ in rec.calls] == [0, 1, 2, 3, 4, 5]
    assert sched.resident_bytes == 0
    sched.close()


def test_slots_are_distinct_while_held() -> None:
    sched, _rec = make(n_slots=3, depth=2)
    s0, _ = sched.acquire(0)
    held = {sched.slot_of(i) for i in (0, 1, 2)}
    assert held == {0, 1, 2} and s0 in held
    sched.release(0)
    _s1, _ = sched.acquire(1)
    assert sched.slot_of(3) == s0  # layer 3 reuses the slot layer 0 left
    sched.release(1)
    sched.close()


def test_depth_limited_by_slots() -> None:
    sched, rec = make(n_slots=2, depth=5)
    assert sched.depth == 1
    sched.acquire(0)
    settle(sched)
    assert [layer for layer, _ in rec.calls] == [0, 1]
    sched.release(0)
    sched.close()


def test_out_of_order_call_drops_stale_prefetch() -> None:
    sched, _rec = make(n_slots=3, depth=2)
    run_forward(sched, [0])
    assert run_forward(sched, [4]) == ["weights 4"]  # not prefetched: fetched now, the window moves
    assert {sched.slot_of(i) for i in (5, 0)} <= {0, 1, 2}
    assert sched.slot_of(1) is None and sched.slot_of(2) is None
    sched.close()


def test_running_prefetch_drains_before_its_slot_is_reused() -> None:
    sched, rec = make(n_slots=2, depth=1)
    gate = rec.gates[1] = threading.Event()
    sched.acquire(0)  # layer 1 starts fetching and blocks on its gate
    sched.release(0)
    time.sleep(0.05)
    threading.Timer(0.1, gate.set).start()
    assert run_forward(sched, [3]) == ["weights 3"]  # layer 1 now stale; its slot drains, then is reused
    sched.close()


def test_hold_keeps_layer_until_another_is_acquired() -> None:
    sched, rec = make(n_slots=3, depth=1)
    sched.hold = True
    for _ in range(3):  # three micro-batches through layer 0: one fetch
        sched.acquire(0)
        sched.release(0)
    settle(sched)
    assert [layer for layer, _ in rec.calls] == [0, 1]
    sched.acquire(1)
    assert sched.slot_of(0) is None  # passed: dropped when layer 1 was acquired
    sched.release(1)
    sched.close()


def test_fetch_error_names_layer_and_resets() -> None:
    sched, rec = make()
    rec.fail.add(2)
    run_forward(sched, [0, 1])
    with pytest.raises(OffloadError, match=r"layer 2.*cannot read layer 2") as info:
        sched.acquire(2)
    assert info.value.layer == 2
    assert all(s.layer is None and s.future is None for s in sched.slots)
    rec.fail.clear()
    assert run_forward(sched, range(6)) == [f"weights {i}" for i in range(6)]  # usable again
    sched.close()


def test_all_slots_in_use_is_an_error_not_a_deadlock() -> None:
    sched, _rec = make(n_slots=1, depth=0)
    sched.acquire(0)
    with pytest.raises(OffloadError, match="no free slot"):
        sched.acquire(1)
    sched.close()


def test_close_stops_reader_threads() -> None:
    before = {t.name for t in threading.enumerate()}
    sched, _rec = make()
    run_forward(sched, range(6))
    sched.close()
    after = {t.name for t in threading.enumerate() if t.name.startswith("llm_offload-reader")}
    assert not (after - before)
