"""The KV cache and the one owner of sequence state.

`KVCache` holds preallocated buffers (B, H_kv, S, D) per decoder layer, keyed by the layer's index in the
model (so one cache serves one part, a chain of parts across devices, or a pipeline stage's layers), and
the state of every row: how many slots it uses (`lengths`) and which slots hold real tokens (`valid`, for
left padding). Parts read the state and write the buffers; only the cache's owner (a forward_func, a
chain, a pipeline driver, a server's batcher) moves the state, through `begin` and `commit`.

Rows are independent: each has its own length, so a batch can hold sequences that started at different
times. `add_row` / `remove_row` let a server admit and retire requests between steps; `reorder` lets beam
search follow its beams. A row's slot s holds its token at position (number of valid slots <= s) - 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


class CacheOverflowError(RuntimeError):
    """A call would write past the cache's `max_seq_len`."""


@dataclass
class Slots:
    """Where one call's T new tokens go: rows `rows` of the cache, row r at slots [starts[r], starts[r] + T).

    `start` is set when every row starts at the same slot (then the writes are one contiguous slice);
    `starts_t` is `starts` as a tensor on the cache's device. `valid` (R, end) and `positions` (R, T) cover
    those rows; `padded` says whether any slot below a row's length holds no token."""

    rows: slice
    starts: list[int]
    start: int | None
    starts_t: torch.Tensor
    end: int
    new_tokens: int
    valid: torch.Tensor
    positions: torch.Tensor
    padded: bool


class KVCache:
    def __init__(
        self,
        shapes: Mapping[int, tuple[int, ...]],
        batch_size: int,
        max_seq_len: int,
        *,
        device: torch.device | str | Mapping[int, torch.device | str],
        dtype: torch.dtype | Mapping[int, torch.dtype],
        rows: int | None = None,
    ) -> None:
        """`shapes[layer]` is (key/value heads, head_dim) of that layer, or (heads, key dim, value dim) when
        values differ from keys (DeepSeek's MLA caches its latent as keys and no values). `device` and
        `dtype` may be given per layer (a chain across devices). `rows`: rows in use from the start (default
        all `batch_size`; 0 for a server that adds them as requests come)."""
        if not _is_positive_int(batch_size) or not _is_positive_int(max_seq_len):
            raise ValueError(
                f"KVCache: batch_size and max_seq_len must be >= 1, got {batch_size}, {max_seq_len}"
            )
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        for layer, s in shapes.items():
            dev = device[layer] if isinstance(device, Mapping) else device
            dt = dtype[layer] if isinstance(dtype, Mapping) else dtype
            self.keys[layer] = torch.zeros(batch_size, s[0], max_seq_len, s[1], device=dev, dtype=dt)
            self.values[layer] = torch.zeros(batch_size, s[0], max_seq_len, s[-1], device=dev, dtype=dt)
        first = next(iter(self.keys.values()), None)
        home = first.device if first is not None else torch.device("cpu")
        self.valid = torch.zeros(batch_size, max_seq_len, dtype=torch.bool, device=home)
        self.lengths = [0] * batch_size
        self.rows = batch_size if rows is None else rows
        if not 0 <= self.rows <= batch_size:
            raise ValueError(f"KVCache: rows must be in [0, {batch_size}], got {rows}")
        self.has_padding = False

    # ---- state -----------------------------------------------------------------------------------

    @property
    def seq_len(self) -> int:
        """Slots used by the longest row in use (every row's length when they move together)."""
        return max(self.lengths[: self.rows], default=0)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[index], self.values[index]

    def begin(
        self, new_tokens: int, attention_mask: torch.Tensor | None = None, rows: slice | None = None
    ) -> Slots:
        """Place `new_tokens` tokens after each row's cached ones (rows `rows`, default all in use) and
        mark which are real: `attention_mask` (R, length + T) as HF's, 1 = token, 0 = padding, for rows of
        equal length. Nothing moves until `commit`."""
        rows = slice(0, self.rows) if rows is None else rows
        r0, r1 = rows.start or 0, self.rows if rows.stop is None else rows.stop
        if not 0 <= r0 < r1 <= self.rows:
            raise ValueError(f"rows {r0}..{r1} are not rows in use (0..{self.rows})")
        starts = self.lengths[r0:r1]
        end = max(starts) + new_tokens
        if end > self.max_seq_len:
            raise CacheOverflowError(
                f"KV cache overflow: {max(starts)} cached + {new_tokens} new tokens > max_seq_len="
                f"{self.max_seq_len}; use a larger max_seq_len, rewind(n) or reset()"
            )
        uniform = min(starts) == max(starts)
        valid = self.valid[r0:r1]
        if attention_mask is not None:
            if not uniform or attention_mask.shape != (r1 - r0, end):
                raise ValueError(
                    "attention_mask must cover the whole sequence so far, shape (B, seq_len + T) = "
                    f"({r1 - r0}, {end}), for rows of equal length; got {tuple(attention_mask.shape)}"
                )
            mask = attention_mask.to(device=valid.device, dtype=torch.bool)
            valid[:, :end] = mask
            self.has_padding = self.has_padding or not bool(mask.all())
        elif uniform:
            valid[:, starts[0] : end] = True
        else:
            for r, s in enumerate(starts):
                valid[r, s : s + new_tokens] = True
        starts_t = torch.tensor(starts, device=valid.device)
        positions = self._positions(valid, starts, starts_t, new_tokens, uniform)
        return Slots(
            rows,
            starts,
            starts[0] if uniform else None,
            starts_t,
            end,
            new_tokens,
            valid[:, :end],
            positions,
            self.has_padding,
        )

    def _positions(
        self, valid: torch.Tensor, starts: list[int], starts_t: torch.Tensor, t: int, uniform: bool
    ) -> torch.Tensor:
        offsets = torch.arange(t, device=valid.device)
        if not self.has_padding:
            if uniform:
                return (offsets + starts[0])[None]
            return starts_t[:, None] + offsets
        slots = starts_t[:, None] + offsets  # (R, T)
        counted = valid.long().cumsum(-1).gather(1, slots) - 1
        return counted.masked_fill(~valid.gather(1, slots), 1)

    def commit(self, slots: Slots) -> None:
        """The call `slots` was planned for has run: its rows now hold its tokens."""
        r0 = slots.rows.start or 0
        for r, s in enumerate(slots.starts):
            self.lengths[r0 + r] = s + slots.new_tokens

    def rewind(self, n: int, row: int | None = None) -> None:
        """Drop the last `n` tokens of every row in use (or of row `row`)."""
        rows = range(self.rows) if row is None else [row]
        for r in rows:
            if not 0 <= r < self.rows or not 0 <= n <= self.lengths[r]:
                raise ValueError(
                    f"rewind({n}): row {r} holds {self.lengths[r] if 0 <= r < self.rows else 0} tokens"
                )
        for r in rows:
            self.lengths[r] -= n

    def reset(self) -> None:
        """Forget every token (the buffers stay allocated); every row stays in use."""
        self.lengths = [0] * self.batch_size
        self.valid.zero_()
        self.has_padding = False

    def add_row(self) -> int:
        """Take a free row for a new sequence (length 0) and return its index."""
        if self.rows == self.batch_size:
            raise CacheOverflowError(f"KV cache: all {self.batch_size} rows are in use")
        row = self.rows
        self.rows += 1
        self.lengths[row] = 0
        self.valid[row] = False
        return row

    def remove_row(self, row: int) -> int | None:
        """Retire row `row`. The last row in use moves into its place (one copy of that row): returns the
        index it had, or None when `row` was the last one. Rows in use stay 0..rows-1."""
        if not 0 <= row < self.rows:
            raise ValueError(f"remove_row({row}): rows in use are 0..{self.rows - 1}")
        last = self.rows - 1
        if row != last:
            for t in (*self.keys.values(), *self.values.values()):
                t[row].copy_(t[last])
            self.valid[row] = self.valid[last]
            self.lengths[row] = self.lengths[last]
        self.rows -= 1
        self.lengths[last] = 0
        self.valid[last] = False
        return last if row != last else None

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Empty row `dst` starts with row `src`'s first `n` slots: a prompt prefix several rows share is
        computed once (a server prefilling requests with one system prompt)."""
        ok = 0 <= src < self.rows and 0 <= dst < self.rows and src != dst
        if not ok or not 0 <= n <= self.lengths[src] or self.lengths[dst] != 0:
            raise ValueError(
                f"copy_prefix({src}, {dst}, {n}): needs two rows in use (0..{self.rows - 1}), the first "
                f"holding at least {n} slots, the second empty"
            )
        for t in (*self.keys.values(), *self.values.values()):
            t[dst, :, :n] = t[src, :, :n]
        self.valid[dst, :n] = self.valid[src, :n]
        self.lengths[dst] = n

    def reorder(self, rows: torch.Tensor | Sequence[int]) -> None:
        """Row i becomes a copy of old row rows[i] (beam search follows its beams); len(rows) rows in use."""
        index = torch.as_tensor(rows, dtype=torch.long)
        if (
            index.dim() != 1
            or index.numel() > self.batch_size
            or (index.numel() and (index.min() < 0 or index.max() >= self.rows))
        ):
            raise ValueError(
                f"reorder: rows must be indices of rows in use (0..{self.rows - 1}), got {index.tolist()}"
            )
        n = index.numel()
        for t in (*self.keys.values(), *self.values.values()):
            t[:n] = t.index_select(0, index.to(t.device))
        self.valid[:n] = self.valid.index_select(0, index.to(self.valid.device))
        self.lengths[:n] = [self.lengths[i] for i in index.tolist()]
        self.rows = n

    def grown(self, max_seq_len: int) -> KVCache:
        """A larger cache holding the same contents (for owners that grow on demand)."""
        shapes = {i: (k.shape[1], k.shape[3], self.values[i].shape[3]) for i, k in self.keys.items()}
        new = KVCache(
            shapes,
            self.batch_size,
            max_seq_len,
            device={i: k.device for i, k in self.keys.items()} or self.valid.device,
            dtype={i: k.dtype for i, k in self.keys.items()} or torch.float32,
            rows=self.rows,
        )
        n = min(self.max_seq_len, max_seq_len)
        for old, fresh in zip(
            (*self.keys.values(), *self.values.values()),
            (*new.keys.values(), *new.values.values()),
            strict=True,
        ):
            fresh[:, :, :n] = old[:, :, :n]
        new.valid[:, :n] = self.valid[:, :n]
        new.lengths, new.has_padding = list(self.lengths), self.has_padding
        return new

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))


def _is_positive_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1
