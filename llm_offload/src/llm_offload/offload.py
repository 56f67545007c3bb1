"""`offload(modules, source, device)`: hooks that stream each module's weights in just before it runs.

Each module keeps its Python identity and its forward; only its weights change: at `offload` they are
released to `meta` placeholders, before a forward the hook swaps in the device tensors the scheduler fetched
(views into a preallocated slot on CUDA), after it the placeholders go back and the slot is free again.

Longer than our usual 400 lines because the `Offload` handle, its hooks and the resident-layer plan share
one piece of state (which module holds which slot) and read best side by side.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, TypeVar

import torch
from torch import nn

from .backend import Backend, LayerLayout
from .binding import WeightBinding, managed_names
from .blocks import BlockRunner
from .cpu import CpuBackend
from .scheduler import OffloadError, Scheduler
from .sources import as_source
from .stats import OffloadStats, StatsRecorder

log = logging.getLogger(__name__)
T = TypeVar("T")
_MARK = "_llm_offload_position"  # set on each offloaded module while its hooks are in place


class Offload:
    """The handle `offload()` returns. See `offload` for the arguments."""

    def __init__(
        self,
        modules: Iterable[nn.Module],
        source: Any,
        device: torch.device | str,
        *,
        prefetch_depth: int = 2,
        max_resident_bytes: int | None = None,
        resident: Iterable[int] | Literal["auto"] = "auto",
        threads: int | None = None,
        cyclic: bool = True,
        backend: Backend | None = None,
    ) -> None:
        self.modules = list(modules)
        n = len(self.modules)
        if n == 0:
            raise ValueError("offload: no modules given")
        if not all(isinstance(m, nn.Module) for m in self.modules):
            raise TypeError("offload: modules must be nn.Module instances (e.g. hf_model.model.layers)")
        taken = [i for i, m in enumerate(self.modules) if getattr(m, _MARK, None) is not None]
        if taken:
            raise ValueError(
                f"offload: module {taken[0]} is already offloaded; call .remove() on that Offload first"
            )
        if prefetch_depth < 0:
            raise ValueError(f"prefetch_depth must be >= 0, got {prefetch_depth}")
        if max_resident_bytes is not None and max_resident_bytes <= 0:
            raise ValueError(f"max_resident_bytes must be positive, got {max_resident_bytes}")
        self.source = as_source(source)
        self.device = torch.device(device)
        if len(self.modules) > _source_len(self.source, n):
            missing = _source_len(self.source, n)
            raise ValueError(
                f"offload: {self.source!r} holds {missing} layers but {n} modules were given "
                f"(module {missing} and after have no weights)"
            )
        if backend is None:
            backend = _default_backend(self.device)
        self.backend = backend

        keys = [self._source_keys(i) for i in range(n)]
        self._bindings = [
            WeightBinding(m, managed_names(m, k)) for m, k in zip(self.modules, keys, strict=True)
        ]
        self.layouts = [LayerLayout.pack(b.shapes()) for b in self._bindings]
        need = [max(lay.nbytes, _source_nbytes(self.source, i)) for i, lay in enumerate(self.layouts)]
        self.resident = self._plan_resident(resident, need, prefetch_depth, max_resident_bytes)
        self._resident_set = frozenset(self.resident)
        streamed = [i for i in range(n) if i not in self._resident_set]
        budget = (
            None if max_resident_bytes is None else max_resident_bytes - sum(need[i] for i in self.resident)
        )
        slot_bytes = max((need[i] for i in streamed), default=0)
        for i in streamed:
            if max_resident_bytes is not None and need[i] > max_resident_bytes:
                raise ValueError(
                    f"offload: {self._describe(i)} needs {need[i]} bytes, more than max_resident_bytes="
                    f"{max_resident_bytes}"
                )
        if budget is not None and streamed and slot_bytes > budget:
            raise ValueError(
                f"offload: the resident layers {sorted(self.resident)} leave {budget} bytes of "
                f"max_resident_bytes, less than the {slot_bytes} bytes one streamed layer needs"
            )
        n_slots = min(1 + prefetch_depth, len(streamed))
        if budget is not None and streamed:
            n_slots = min(n_slots, budget // slot_bytes)
            if n_slots < 1 + min(prefetch_depth, len(streamed) - 1):
                log.info(
                    "max_resident_bytes allows %d slots: prefetching %d layers ahead", n_slots, n_slots - 1
                )
        self.slot_bytes = slot_bytes
        self.stats_recorder = StatsRecorder(n, set(self.resident))
        self._tls = threading.local()
        self._blocks: BlockRunner | None = None
        self._handles: list[Any] = []
        self._resident_tensors: dict[int, dict[str, torch.Tensor]] = {}
        self._closed = False

        if threads is None:
            threads = 2 if self.device.type == "cuda" else 1
        self.scheduler: Scheduler | None = None
        if streamed:
            # Slots made under torch.inference_mode would be inference tensors, which the reader threads
            # (outside that mode) may not copy into.
            with torch.inference_mode(False):
                backend.allocate(max(n_slots, 1), slot_bytes)
            self.scheduler = Scheduler(
                streamed,
                self._fetch,
                n_slots=max(n_slots, 1),
                depth=prefetch_depth,
                layer_bytes=lambda i: self.layouts[i].nbytes,
                threads=threads,
                cyclic=cyclic,
                describe=self._describe,
                on_bytes=self.stats_recorder.peak,
            )
        for b in self._bindings:
            b.clear()  # release whatever the modules held
        for i in self.resident:
            self._load_resident(i)
        for i, m in enumerate(self.modules):
            setattr(m, _MARK, i)
            self._handles.append(m.register_forward_pre_hook(self._make_pre_hook(i)))
            self._handles.append(m.register_forward_hook(self._make_post_hook(i), always_call=True))

    # -- set-up ---------------------------------------------------------------------------------------------

    def _describe(self, i: int) -> str:
        where = ""
        file = getattr(self.source, "file", None)
        if file is not None:
            with contextlib.suppress(Exception):
                where = f", {file(i)}"
        return f"offloaded layer {i} ({type(self.modules[i]).__name__}{where})"

    def _source_keys(self, i: int) -> Iterable[str] | None:
        try:
            return _source_keys(self.source, i)
        except Exception as e:
            raise OffloadError(f"{self._describe(i)}: {self.source!r}: {type(e).__name__}: {e}", i) from e

    def _plan_resident(
        self, resident: Iterable[int] | str, need: list[int], depth: int, budget: int | None
    ) -> list[int]:
        n = len(need)
        if resident == "auto":
            if budget is None:
                return []
            if sum(need) <= budget:
                return list(range(n))  # everything fits: nothing to stream, no reader thread, no copies
            left = budget - (1 + depth) * max(need)
            chosen: list[int] = []
            for i in _ends_first(n):
                if len(chosen) < n - 1 and need[i] <= left:  # keep at least one layer streaming
                    chosen.append(i)
                    left -= need[i]
            return sorted(chosen)
        if isinstance(resident, str):
            raise ValueError(f"resident must be 'auto' or layer positions, got {resident!r}")
        chosen = sorted({i % n if -n <= i < n else _bad_resident(i, n) for i in resident})
        if budget is not None and sum(need[i] for i in chosen) > budget:
            raise ValueError(
                f"offload: resident layers {chosen} need {sum(need[i] for i in chosen)} bytes, more than "
                f"max_resident_bytes={budget}"
            )
        return chosen

    def _load_resident(self, i: int) -> None:
        try:
            host = self._checked(i, self.source.load(i))
            tensors = {k: v.to(self.device) for k, v in host.items()}
            self._bindings[i].assign(tensors)
        except Exception as e:
            raise OffloadError(f"{self._describe(i)} (resident): {type(e).__name__}: {e}", i) from e
        self._resident_tensors[i] = tensors

    # -- reader threads -------------------------------------------------------------------------------------

    def _fetch(self, i: int, slot: int) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        hint = getattr(self.source, "hint", None)
        following = self.scheduler.after(i) if self.scheduler is not None else None
        if hint is not None and following is not None:
            with contextlib.suppress(Exception):  # a hint only; the layer's own load reports real problems
                hint(following)  # the kernel reads the next layer while this thread maps this one
        buf = self.backend.staging(
            slot,
            reads_into=bool(getattr(self.source, "reads_into", False)),
            zero_copy=bool(getattr(self.source, "zero_copy", False)),
        )
        host = self._checked(i, self.source.load(i, into=buf))
        out = self.backend.upload(slot, host, self.layouts[i])
        self.stats_recorder.add(i, "transfer_s", time.perf_counter() - start)
        device_time = self.backend.upload_time(slot)
        if device_time is not None:
            self.stats_recorder.add_later(i, "transfer_s", device_time)
        self.stats_recorder.count(i, loads=1, nbytes=self.layouts[i].data_bytes)
        return out

    def _checked(self, i: int, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The managed tensors of module i from the source's state dict, checked against the module."""
        out = {}
        for spec in self.layouts[i].tensors:
            t = sd.get(spec.name)
            if t is None:
                have = ", ".join(sorted(sd)[:8])
                raise KeyError(f"the source has no tensor {spec.name!r} for this layer (it has: {have} ...)")
            if tuple(t.shape) != spec.shape:
                raise ValueError(
                    f"tensor {spec.name!r} has shape {tuple(t.shape)}, the module expects {spec.shape}"
                )
            if t.dtype != spec.dtype:
                t = t.to(spec.dtype)
            out[spec.name] = t
        return out

    # -- hooks (compute thread) -----------------------------------------------------------------------------

    def _make_pre_hook(self, i: int) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: Any) -> None:
            self._pre(i)

        return pre_hook

    def _make_post_hook(self, i: int) -> Callable[..., None]:
        def post_hook(module: nn.Module, args: Any, output: Any) -> None:
            self._post(i, failed=output is None)

        return post_hook

    def _stack(self) -> list[tuple[int, int | None, Any, Any]]:
        stack = getattr(self._tls, "stack", None)
        if stack is None:
            stack = self._tls.stack = []
        return stack

    def _pre(self, i: int) -> None:
        if self._closed:
            raise OffloadError(f"{self._describe(i)}: the offload was removed", i)
        if self._blocks is not None:
            self._blocks.turn()  # block schedule: let the other micro-batches reach this layer first
        if i in self._resident_set or self.scheduler is None:
            self._stack().append((i, None, None, self.backend.mark()))
            return
        t0 = time.perf_counter()
        slot, tensors = self.scheduler.acquire(i)
        waited = time.perf_counter() - t0
        try:
            before = self.backend.mark()
            self.backend.acquire(slot)
            start = self.backend.mark()
            self._bindings[i].assign(tensors)
        except BaseException as e:
            self.scheduler.release(i)
            if isinstance(e, Exception):
                raise OffloadError(f"{self._describe(i)}: {type(e).__name__}: {e}", i) from e
            raise
        self.stats_recorder.add(i, "stall_s", waited)
        self._stack().append((i, slot, before, start))

    def _post(self, i: int, *, failed: bool) -> None:
        stack = self._stack()
        if not stack or stack[-1][0] != i:
            return  # the pre-hook failed: nothing acquired
        _, slot, before, start = stack.pop()
        exc = sys.exc_info()[1] if failed else None
        if exc is not None and hasattr(exc, "add_note"):
            note = f"(raised in {self._describe(i)})"
            if note not in getattr(exc, "__notes__", ()):
                exc.add_note(note)
        end = self.backend.mark()
        self._timing(i, "compute_s", start, end)
        self.stats_recorder.count(i, calls=1)
        if slot is None:
            return
        self._timing(i, "stall_s", before, start)
        self.backend.release(slot)
        self._bindings[i].clear()
        assert self.scheduler is not None
        self.scheduler.release(i)

    def _timing(self, i: int, what: str, start: Any, end: Any) -> None:
        seconds = self.backend.elapsed(start, end)
        if seconds is not None:
            self.stats_recorder.add(i, what, seconds)
        else:
            self.stats_recorder.add_later(i, what, lambda: self.backend.elapsed(start, end))

    # -- public ---------------------------------------------------------------------------------------------

    @property
    def stats(self) -> OffloadStats:
        """Per-module compute / transfer / stall seconds since the last `reset_stats()`, and totals."""
        return self.stats_recorder.snapshot(self.backend.wait_all)

    def reset_stats(self) -> None:
        self.stats_recorder.snapshot(self.backend.wait_all)
        self.stats_recorder.reset()

    def evict(self) -> None:
        """Drop the streamed layers held now (prefetched for the next forward): frees their memory."""
        if self.scheduler is not None:
            self.scheduler.evict()

    def run_blocks(self, micro_batches: Iterable[T], fn: Callable[[T], Any]) -> list[Any]:
        """`[fn(mb) for mb in micro_batches]`, but layer by layer: each layer is loaded once for all of them.

        FlexGen's block schedule: `fn` runs a forward of the model (with that micro-batch's own KV cache);
        every micro-batch runs layer i before any runs layer i+1, so one fetch of layer i serves them all and
        throughput grows with the number of micro-batches. Each `fn` runs on its own thread, one at a time.
        """
        if self._blocks is not None:
            raise RuntimeError("run_blocks is already running on this offload")
        items = list(micro_batches)
        runner = BlockRunner(len(items))
        if self.scheduler is not None:
            self.scheduler.hold = True
        self._blocks = runner
        try:
            return runner.run(items, fn)
        finally:
            self._blocks = None
            if self.scheduler is not None:
                self.scheduler.hold = False
                if runner.failed:
                    self.scheduler.reset()

    def remove(self, *, materialize: bool = False) -> None:
        """Remove the hooks and stop the reader threads. The modules keep `meta` weights unless
        `materialize=True`, which loads every module's weights onto the device for good."""
        if self._closed:
            return
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.scheduler is not None:
            self.scheduler.close()
        self.backend.close()
        self._closed = True
        for m in self.modules:
            if hasattr(m, _MARK):
                delattr(m, _MARK)
        for i, b in enumerate(self._bindings):
            if materialize and i not in self.resident:
                host = self._checked(i, self.source.load(i))
                b.assign({k: v.to(self.device, copy=True) for k, v in host.items()})
            elif not materialize:
                b.clear()

    def __enter__(self) -> Offload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def offload(
    modules: Iterable[nn.Module],
    source: Any,
    device: torch.device | str = "cpu",
    *,
    prefetch_depth: int = 2,
    max_resident_bytes: int | None = None,
    resident: Iterable[int] | Literal["auto"] = "auto",
    threads: int | None = None,
    cyclic: bool = True,
) -> Offload:
    """Stream the weights of `modules` from `source` onto `device` while the model's own forward runs.

    modules: the modules in the order the forward calls them (`hf_model.model.layers`, `part.layers`).
    source: a `CpuSource`, a `SepweightSource`, a callable `i -> state_dict`, or a list of state dicts;
        `i` is a module's position in `modules`, names are the module's own (`self_attn.q_proj.weight`).
    device: where the layers compute ("cpu", "cuda", "cuda:1").
    prefetch_depth: how many layers ahead of the running one are fetched.
    max_resident_bytes: bound on the bytes of weights held on the device at once (resident layers plus
        streaming slots); the prefetch depth shrinks to fit. A layer larger than this raises ValueError.
    resident: positions of modules loaded once and kept (never streamed), or "auto" (the default) to keep
        as many as fit `max_resident_bytes` after the streaming slots, first and last layers first (all of
        them when all fit; none without a budget). `()` streams every module whatever the budget.
    threads: reader threads (default 1 on CPU, 2 on CUDA).
    cyclic: after the last module, prefetch the first ones again (the next forward / decode step).
    """
    return Offload(
        modules,
        source,
        device,
        prefetch_depth=prefetch_depth,
        max_resident_bytes=max_resident_bytes,
        resident=resident,
        threads=threads,
        cyclic=cyclic,
    )


class OffloadedSequential(nn.Module):
    """`x = m(x)` for each module in order, with the weights streamed (the handle is `.offload`)."""

    def __init__(
        self, modules: Iterable[nn.Module], source: Any, device: torch.device | str = "cpu", **kwargs: Any
    ):
        super().__init__()
        self.layers = nn.ModuleList(modules)
        self.offload = offload(self.layers, source, device, **kwargs)

    def forward(self, x: Any) -> Any:
        for layer in self.layers:
            x = layer(x)
        return x


def move_resident(model: nn.Module, device: torch.device | str) -> nn.Module:
    """`model.to(device)` that leaves offloaded (`meta`) weights alone: moves everything else."""
    device = torch.device(device)
    for module in model.modules():
        stores: tuple[dict[str, Any], ...] = (module._parameters, module._buffers)
        for store in stores:
            for name, t in store.items():
                if t is None or t.device.type == "meta" or t.device == device:
                    continue
                moved = t.detach().to(device)
                store[name] = nn.Parameter(moved, t.requires_grad) if isinstance(t, nn.Parameter) else moved
    return model


def _default_backend(device: torch.device) -> Backend:
    if device.type == "cpu":
        return CpuBackend(device)
    if device.type == "cuda":
        from .cuda import CudaBackend

        return CudaBackend(device)
    raise ValueError(f"offload: unsupported device {device} (use 'cpu' or 'cuda')")


def _source_len(source: Any, default: int) -> int:
    try:
        return len(source)
    except TypeError:
        return default


def _source_keys(source: Any, i: int) -> Iterable[str] | None:
    keys = getattr(source, "keys", None)
    if keys is not None and getattr(source, "reads_into", False):
        return keys(i)  # from the files' headers: nothing read yet
    if (
        hasattr(source, "layer_nbytes")
        and getattr(source, "zero_copy", False)
        and not hasattr(source, "header")
    ):
        return source.load(i).keys()  # in memory already: cheap
    return None


def _source_nbytes(source: Any, i: int) -> int:
    fn = getattr(source, "layer_nbytes", None)
    n = fn(i) if fn is not None else None
    return int(n) if n is not None else 0


def _ends_first(n: int) -> list[int]:
    order = []
    lo, hi = 0, n - 1
    while lo <= hi:
        order.append(lo)
        if hi != lo:
            order.append(hi)
        lo, hi = lo + 1, hi - 1
    return order


def _bad_resident(i: int, n: int) -> int:
    raise ValueError(f"resident: no module at position {i} (there are {n})")
