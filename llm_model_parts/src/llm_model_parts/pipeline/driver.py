"""Rank 0's side of the pipeline: `PipelineDriver`, an incremental forward_func over every rank's part.

Each call splits the batch into micro-batches (rows) and long inputs into chunks (positions), runs rank 0's
own part on each and sends the hidden states down; the last rank sends logits (or only the last position's,
or the argmax token ids) back. Several micro-batches are in flight at once, so during a prefill every stage
computes while the others do. Commands (reset, rewind, row moves, shutdown) flow down the same path, so they
stay ordered with the data. When idle, the driver sends a heartbeat round the ring every `timeout / 4` s.

The driver owns the sequence: `seq_len` and `batch_size` (a fixed batch) or each row's length (the rows
protocol, rows.py) are authoritative, and every rank's caches (one per micro-batch, or one stage-wide rows
cache, see stage.py) follow its calls, row moves, rewinds and resets.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from llm_model_parts.pipeline.handshake import check_chain, handshake
from llm_model_parts.pipeline.rows import Rows, RowsProtocol, split_rows
from llm_model_parts.pipeline.stage import (
    OUTPUTS,
    Output,
    Stage,
    StageCaches,
    StageInfo,
    logits_to_compute,
    output_mode,
    select_output,
)
from llm_model_parts.pipeline.transport import (
    TAG_DOWN,
    TAG_RETURN,
    Command,
    Header,
    Link,
    PipelineError,
    RemoteError,
    decode_text,
    link_device,
)

logger = logging.getLogger(__name__)


class PipelineDriver(RowsProtocol):
    """Rank 0's side: an incremental forward_func over the whole pipeline.

    `driver(new_ids, attention_mask=None)` returns logits [B, T, V] (output="logits"), the last position's
    [B, 1, V] ("last": 1/T of the traffic back, enough to generate) or argmax ids [B, T] ("argmax").
    `micro_batches` splits the rows, `prefill_chunk` splits long inputs into chunks of that many positions,
    so that the stages work on different pieces at once. `logits_to_keep` (HF's) overrides `output` per
    call: 0 = every position, 1 = the last. The rows protocol (docs/forward_func.md, rows.py): `add_row()`,
    `remove_row(row)`, `driver(new_ids, attention_mask, rows=slice(a, b))`, `rewind(n, row=r)`.
    """

    def __init__(
        self,
        stage: Stage | None,
        *,
        infos: list[StageInfo] | None = None,
        world: int | None = None,
        micro_batches: int = 1,
        prefill_chunk: int | None = None,
        output: str = "logits",
        max_rows: int = 8,
        timeout: float = 60.0,
        heartbeat: float | None = None,
        on_failure: Callable[[PipelineError], None] | None = None,
        owns_group: bool = False,
    ) -> None:
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 or None, got {prefill_chunk}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be an int >= 1, got {max_rows!r}")
        self.world = dist.get_world_size() if world is None and dist.is_initialized() else (world or 1)
        self.stage = stage
        self.micro_batches = micro_batches
        self.prefill_chunk = prefill_chunk
        self.output = output
        self.max_rows = max_rows
        self.timeout = timeout
        self.on_failure = on_failure
        self.owns_group = owns_group  # close() destroys the process group (start_pipeline created it)
        self._caches = StageCaches(stage) if stage is not None else None
        own = stage.info if stage is not None else StageInfo.driver_only()
        if self.world > 1:
            self.infos = infos if infos is not None else handshake(own, 0, self.world, timeout=timeout)
        else:
            self.infos = [own]
            check_chain(self.infos, complete=True)
        self.max_seq_len = min(i.max_seq_len for i in self.infos if i.spec)
        self.vocab_size = self.infos[-1].vocab_size
        self.device = torch.device(own.device)
        last_dev = self.infos[-1].device
        first_dev = self.infos[1].device if self.world > 1 else own.device
        self._down = (
            Link(1, TAG_DOWN, timeout, link_device(own.device, first_dev)) if self.world > 1 else None
        )
        self._back = (
            Link(self.world - 1, TAG_RETURN, timeout, link_device(own.device, last_dev))
            if self.world > 1
            else None
        )
        self._seq_len = 0
        self.batch_size: int | None = None
        self._rows: Rows | None = None  # in the rows protocol: from the first add_row() to reset()
        self._groups: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        self._failure: PipelineError | None = None
        self._closed = False
        self._last_activity = time.monotonic()
        self._stop = threading.Event()
        self._pings = 0
        self._heartbeat: threading.Thread | None = None
        if self.world > 1:
            interval = heartbeat if heartbeat is not None else timeout / 4
            self._heartbeat = threading.Thread(
                target=self._beat, args=(interval,), name="pipeline-heartbeat", daemon=True
            )
            self._heartbeat.start()

    @property
    def failure(self) -> PipelineError | None:
        """The error that stopped the pipeline (a rank died, hung or raised; later calls raise it), or None."""
        return self._failure

    @property
    def seq_len(self) -> int:
        """Tokens per row of the fixed batch; with rows, those of the longest row in use."""
        return max(self._rows.lengths, default=0) if self._rows is not None else self._seq_len

    # --- the forward_func contract --------------------------------------------------------------------------

    def __call__(
        self,
        new_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        rows: slice | None = None,
        logits_to_keep: int | None = None,
    ) -> torch.Tensor:
        mode, keep = output_mode(self.output, logits_to_keep)
        if rows is None and self._rows is None:
            ids, mask = self._check_call(new_ids, attention_mask)
            groups, base, first = self._groups, self._seq_len, None
        else:
            rows = slice(None) if rows is None else rows
            r0, r1, base = self._in_rows("rows=").check_call(rows, new_ids, attention_mask)
            ids = new_ids.long().to(self.device)
            mask = attention_mask.long().to(self.device) if attention_mask is not None else None
            groups, first = split_rows(r1 - r0, self.micro_batches), r0
        t = ids.shape[1]
        chunk = self.prefill_chunk or t
        items = [(g, s, min(s + chunk, t)) for s in range(0, t, chunk) for g in range(len(groups))]
        with self._guard():
            results = self._run(items, groups, ids, mask, mode, base=base, first_row=first)
        if self._rows is None:
            self._seq_len += t
        else:
            self._rows.commit(r0, r1, t)
        out = self._assemble(results, len(groups), mode)
        return out[:, -keep:] if keep > 1 else out

    def forward_packed(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, tree_mask: torch.Tensor
    ) -> torch.Tensor:
        """Packed prefix-tree logits (docs/forward_func.md); the caches are left as they were."""
        if self.stage is not None and not self.stage.packed:
            raise NotImplementedError("this pipeline's parts do not offer forward_packed")
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"forward_packed takes input_ids [1, N], got {list(input_ids.shape)}")
        if self._rows is not None:
            raise ValueError("forward_packed: not while rows are in use (the rows protocol); reset() first")
        if not self._groups:  # nothing sent yet: after reset() the packed tokens form whole sequences
            self._groups = [(0, 1)]
        n = input_ids.shape[1]
        items = [(0, 0, n)]
        packed = (position_ids.long(), tree_mask.bool())
        with self._guard():
            results = self._run(
                items, self._groups, input_ids.long(), None, Output.LOGITS, base=self._seq_len, packed=packed
            )
        return results[0]

    def reset(self) -> None:
        """Forget every sequence on every rank; the next call may use another batch size."""
        with self._guard():
            if self._caches is not None:
                self._caches.reset()
            if self._down is not None:
                self._down.send(Header(Command.RESET))
        self._seq_len = 0
        self.batch_size = None
        self._rows = None

    def rewind(self, n: int, row: int | None = None) -> None:
        """Drop the last `n` tokens of every row (or of row `row`, with rows) on every rank."""
        if row is not None or self._rows is not None:
            self._rewind_rows(n, row)
            return
        if not 0 <= n <= self.seq_len:
            raise ValueError(f"rewind({n}): the cache holds {self.seq_len} tokens")
        if n == 0:
            return
        with self._guard():
            if self._caches is not None:
                self._caches.rewind(n)
            if self._down is not None:
                self._down.send(Header(Command.REWIND, arg=n))
        self._seq_len -= n

    def close(self) -> None:
        """Shut the workers down (they return from run_worker) and stop the heartbeat."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        try:
            if self._failure is None and self._down is not None and self._back is not None:
                with self._lock:
                    self._down.send(Header(Command.SHUTDOWN))
                    self._down.flush()
                    header, _ = self._back.recv()
                    if header.command != Command.SHUTDOWN:
                        logger.warning("rank %d answered %s to shutdown", self.world - 1, header.command.name)
        finally:
            if self.owns_group and dist.is_initialized():
                dist.destroy_process_group()

    def __enter__(self) -> PipelineDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -------------------------------------------------------------------------------------------

    def _check_call(
        self, new_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(new_ids, torch.Tensor) or new_ids.dim() != 2 or new_ids.dtype.is_floating_point:
            what = list(new_ids.shape) if isinstance(new_ids, torch.Tensor) else type(new_ids).__name__
            raise ValueError(f"new_ids must be integer token ids [B, T], got {what}")
        b, t = new_ids.shape
        if t == 0:
            raise ValueError("new_ids has no tokens")
        if self.batch_size is not None and b != self.batch_size:
            raise ValueError(
                f"new_ids has {b} rows but this sequence has {self.batch_size}; reset() to change the batch"
            )
        if self.seq_len + t > self.max_seq_len:
            raise ValueError(
                f"{self.seq_len} cached + {t} new tokens exceed the pipeline's capacity of {self.max_seq_len} "
                "(max_seq_len of the ranks' caches)"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != (b, self.seq_len + t):
            raise ValueError(
                f"attention_mask must cover the whole sequence, [B, seq_len + T] = [{b}, {self.seq_len + t}], "
                f"got {list(attention_mask.shape)}"
            )
        if self.batch_size is None:
            self.batch_size = b
            self._groups = split_rows(b, self.micro_batches)
        ids = new_ids.long().to(self.device)
        return ids, (attention_mask.long().to(self.device) if attention_mask is not None else None)

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Hold the lock for one operation and record a failure, so that later calls fail fast."""
        if self._closed:
            raise PipelineError("the pipeline is closed")
        if self._failure is not None:
            raise self._failure
        self._lock.acquire()
        try:
            yield
        except PipelineError as e:
            self._fail(e)
            raise
        except BaseException as e:
            # some micro-batches may be in flight: the ranks' caches no longer agree
            self._fail(
                PipelineError(f"a call failed half-way ({type(e).__name__}: {e}); restart the pipeline")
            )
            raise
        finally:
            self._last_activity = time.monotonic()
            self._lock.release()

    def _run(
        self,
        items: list[tuple[int, int, int]],
        groups: list[tuple[int, int]],
        ids: torch.Tensor,
        mask: torch.Tensor | None,
        mode: int,
        *,
        base: int,
        packed: tuple[torch.Tensor, torch.Tensor] | None = None,
        first_row: int | None = None,
    ) -> list[torch.Tensor]:
        """Send `items` (group, chunk start, chunk end) down, collect what comes back. `groups` are row
        ranges of `ids`; a fixed batch addresses group g's cache by g, rows (`first_row` given) address
        rows first_row + r0 .. first_row + r1 of every rank's rows cache. `base`: tokens a mask covers
        before `ids`."""
        local: list[torch.Tensor] = []
        final_start = items[-1][1]
        addresses = [g if first_row is None else first_row + r0 for g, (r0, _) in enumerate(groups)]
        for g, s, e in items:
            r0, r1 = groups[g]
            x = ids[r0:r1, s:e]
            m = mask[r0:r1, : base + e] if mask is not None else None
            item_mode = Output.NONE if mode == Output.LAST and s != final_start else mode
            if self._caches is not None:
                if packed is not None:
                    x = self._caches.forward_packed(
                        g, x, packed[0].to(self.device), packed[1].to(self.device)
                    )
                elif first_row is not None:
                    rows = slice(addresses[g], addresses[g] + r1 - r0)
                    x = self._caches.in_rows("a rows call")(x, m, rows, logits_to_compute(item_mode))
                else:
                    x = self._caches.get(g)(x, attention_mask=m)
            if self._down is None:
                local += select_output(x, item_mode)
                continue
            extra = [m.to(torch.uint8)] if m is not None else []
            if packed is not None:
                extra = [packed[0], packed[1].to(torch.uint8)]
            command = Command.FORWARD if first_row is None else Command.ROWS
            command = Command.PACKED if packed is not None else command
            self._down.send(Header(command, addresses[g], item_mode), [x, *extra])
        if self._down is None:
            return local
        assert self._back is not None
        results = []
        for g, _s, _e in items:
            header, tensors = self._back.recv()
            if header.command == Command.ERROR:
                raise RemoteError(decode_text(tensors))
            if header.command != Command.RESULT or header.item != addresses[g]:
                raise PipelineError(
                    f"rank {self.world - 1} sent {header.command.name} for micro-batch {header.item}, "
                    f"expected RESULT for micro-batch {addresses[g]}"
                )
            results += [t.to(self.device) for t in tensors]
        self._down.flush()
        return results

    def _assemble(self, results: list[torch.Tensor], n_groups: int, mode: int) -> torch.Tensor:
        if mode == Output.LAST:
            return torch.cat(results[-n_groups:], 0)
        rows = [torch.cat(results[g::n_groups], 1) for g in range(n_groups)]
        return torch.cat(rows, 0)

    def _beat(self, interval: float) -> None:
        """Heartbeat: when idle for `interval`, send a PING round the ring and wait for its PONG."""
        while not self._stop.wait(interval / 4):
            if time.monotonic() - self._last_activity < interval:
                continue
            if not self._lock.acquire(blocking=False):
                continue
            try:
                if self._failure is not None or self._closed:
                    return
                self._pings += 1
                assert self._down is not None and self._back is not None
                self._down.send(Header(Command.PING, arg=self._pings))
                header, tensors = self._back.recv()
                if header.command == Command.ERROR:
                    raise RemoteError(decode_text(tensors))
                if header.command != Command.PONG or header.arg != self._pings:
                    raise PipelineError(
                        f"heartbeat: rank {self.world - 1} sent {header.command.name}, expected PONG"
                    )
                self._last_activity = time.monotonic()
            except PipelineError as e:
                self._fail(e)
                return
            finally:
                self._lock.release()

    def _fail(self, e: PipelineError) -> None:
        if self._failure is None:
            self._failure = e
            logger.error("pipeline failed: %s", e)
            if self.on_failure is not None:
                self.on_failure(e)
