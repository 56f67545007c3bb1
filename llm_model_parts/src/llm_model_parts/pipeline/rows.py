"""Rank 0's record of the rows in use (the rows protocol of docs/forward_func.md, continuous batching).

`PipelineDriver` keeps each row's length here, as it keeps `seq_len` for a fixed batch: it is authoritative
(every rank's rows cache follows the driver's row moves), so a call that cannot be served fails on rank 0
with a clear error before anything is sent, and the pipeline keeps working.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import torch

from llm_model_parts.cache import CacheOverflowError
from llm_model_parts.pipeline.transport import Command, Header, Link, PipelineError, RemoteError, decode_text

if TYPE_CHECKING:
    from llm_model_parts.pipeline.stage import Stage, StageCaches


class Rows:
    """The rows in use (0 .. len(lengths) - 1) and their lengths; at most `max_rows` rows, `max_seq_len`
    tokens each."""

    def __init__(self, max_rows: int, max_seq_len: int) -> None:
        self.max_rows = max_rows
        self.max_seq_len = max_seq_len
        self.lengths: list[int] = []

    def __len__(self) -> int:
        return len(self.lengths)

    def check_add(self) -> int:
        """The index the next row gets; CacheOverflowError when all `max_rows` are in use."""
        if len(self.lengths) >= self.max_rows:
            raise CacheOverflowError(
                f"all {self.max_rows} rows are in use (max_rows={self.max_rows}); remove_row() one first"
            )
        return len(self.lengths)

    def check_row(self, row: int, what: str) -> None:
        if not isinstance(row, int) or not 0 <= row < len(self.lengths):
            raise ValueError(f"{what}: row must be a row in use (0..{len(self.lengths) - 1}), got {row!r}")

    def check_call(
        self, rows: slice, new_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[int, int, int]:
        """The rows `rows` address (r0, r1) and the length they share (0 when they differ: then there is no
        mask), after checking that `new_ids` (r1 - r0, T) and the mask fit."""
        if not isinstance(new_ids, torch.Tensor) or new_ids.dim() != 2 or new_ids.dtype.is_floating_point:
            what = list(new_ids.shape) if isinstance(new_ids, torch.Tensor) else type(new_ids).__name__
            raise ValueError(f"new_ids must be integer token ids [b - a, T], got {what}")
        if new_ids.shape[1] == 0:
            raise ValueError("new_ids has no tokens")
        n = len(self.lengths)
        r0, r1 = rows.start or 0, n if rows.stop is None else rows.stop
        if rows.step not in (None, 1) or not 0 <= r0 < r1 <= n:
            raise ValueError(f"rows={rows} are not rows in use (0..{n - 1})")
        b, t = new_ids.shape
        if b != r1 - r0:
            raise ValueError(f"new_ids has {b} rows for rows={rows} ({r1 - r0} rows)")
        lengths = self.lengths[r0:r1]
        if max(lengths) + t > self.max_seq_len:
            raise CacheOverflowError(
                f"KV cache overflow: a row holds {max(lengths)} tokens + {t} new > max_seq_len="
                f"{self.max_seq_len} (the pipeline's capacity)"
            )
        uniform = min(lengths) == max(lengths)
        if attention_mask is not None and (not uniform or tuple(attention_mask.shape) != (b, lengths[0] + t)):
            raise ValueError(
                "attention_mask must cover the whole sequence so far, (b - a, length + T), for rows of "
                f"equal length; rows {r0}..{r1 - 1} hold {lengths} tokens, got {list(attention_mask.shape)}"
            )
        return r0, r1, lengths[0] if uniform else 0

    def check_rewind(self, n: int, row: int | None) -> None:
        for r in range(len(self.lengths)) if row is None else [row]:
            self.check_row(r, f"rewind({n}, row={row})")
            if not 0 <= n <= self.lengths[r]:
                raise ValueError(f"rewind({n}): row {r} holds {self.lengths[r]} tokens")

    def commit(self, r0: int, r1: int, t: int) -> None:
        for r in range(r0, r1):
            self.lengths[r] += t

    def rewind(self, n: int, row: int | None) -> None:
        for r in range(len(self.lengths)) if row is None else [row]:
            self.lengths[r] -= n

    def remove(self, row: int) -> int | None:
        """As KVCache.remove_row: the last row moves into `row`; its old index, or None if it was `row`."""
        last = len(self.lengths) - 1
        self.lengths[row] = self.lengths[last]
        self.lengths.pop()
        return last if row != last else None


class RowsProtocol:
    """`PipelineDriver`'s rows protocol: each operation checks against rank 0's `Rows` record, applies
    the move to rank 0's own stage and sends it down the ring."""

    stage: Stage | None
    world: int
    max_rows: int
    max_seq_len: int
    batch_size: int | None
    _rows: Rows | None
    _caches: StageCaches | None
    _down: Link | None
    _back: Link | None

    def _guard(self) -> AbstractContextManager[None]:
        raise NotImplementedError

    @property
    def rows(self) -> int:
        """Rows in use (the rows protocol)."""
        return len(self._rows) if self._rows is not None else 0

    def add_row(self) -> int:
        """Start a new sequence in a free row (length 0) on every rank; returns its index. The first call
        after `reset()` allocates `max_rows` rows on every rank; CacheOverflowError when all are in use."""
        if self.batch_size is not None:
            raise ValueError(
                f"add_row: a fixed batch of {self.batch_size} rows is in use (the first call after reset() "
                "fixed it); reset() first"
            )
        if self.stage is not None and self.stage.new_rows is None:
            raise NotImplementedError(f"this pipeline's stage {self.stage.info.spec!r} has no rows protocol")
        rows = self._rows if self._rows is not None else Rows(self.max_rows, self.max_seq_len)
        row = rows.check_add()
        with self._guard():
            if self._caches is not None and self._caches.add_row(self.max_rows) != row:
                raise PipelineError(f"add_row: rank 0's rows cache disagrees with its record (row {row})")
            if self._down is not None:
                self._down.send(Header(Command.ADD_ROW, row, self.max_rows))
                self._expect(Command.ADD_ROW, row)  # a rank that cannot add the row fails here
        self._rows = rows
        rows.lengths.append(0)
        return row

    def remove_row(self, row: int) -> int | None:
        """Retire row `row` on every rank: the last row in use moves into its index. Returns that row's old
        index, or None when `row` was the last one."""
        rows = self._in_rows(f"remove_row({row})")
        rows.check_row(row, "remove_row")
        with self._guard():
            if self._caches is not None:
                self._caches.in_rows("remove_row").remove_row(row)
            if self._down is not None:
                self._down.send(Header(Command.REMOVE_ROW, row))
        return rows.remove(row)

    def _rewind_rows(self, n: int, row: int | None) -> None:
        rows = self._in_rows(f"rewind({n}, row={row})")
        rows.check_rewind(n, row)
        if n == 0:
            return
        with self._guard():
            if self._caches is not None:
                self._caches.in_rows("rewind").rewind(n, row)
            if self._down is not None:
                header = Header(Command.REWIND, arg=n) if row is None else Header(Command.REWIND_ROW, row, n)
                self._down.send(header)
        rows.rewind(n, row)

    def _in_rows(self, what: str) -> Rows:
        if self._rows is None:
            raise ValueError(
                f"{what}: no rows are in use; call add_row() first (after reset() if a batch is)"
            )
        return self._rows

    def _expect(self, command: Command, item: int) -> None:
        """Wait for the last rank's answer `command` for `item` (an ERROR raises RemoteError)."""
        assert self._down is not None and self._back is not None
        header, tensors = self._back.recv()
        if header.command == Command.ERROR:
            raise RemoteError(decode_text(tensors))
        if header.command != command or header.item != item:
            raise PipelineError(
                f"rank {self.world - 1} sent {header.command.name} ({header.item}), "
                f"expected {command.name} ({item})"
            )
        self._down.flush()


def split_rows(b: int, micro_batches: int) -> list[tuple[int, int]]:
    """Rows 0..b-1 as up to `micro_batches` contiguous ranges."""
    bounds = torch.tensor_split(torch.arange(b), min(micro_batches, b))
    return [(int(r[0]), int(r[-1]) + 1) for r in bounds]
