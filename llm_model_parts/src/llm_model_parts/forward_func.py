"""The incremental forward_func of docs/forward_func.md over one Part or a chain of Parts.

It owns the sequence state: one `KVCache` for the layers of all its parts (each layer's buffers on its
part's device); the parts only read it and write their layers' slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from llm_model_parts.cache import CacheOverflowError, KVCache

if TYPE_CHECKING:
    from llm_model_parts.part import Part

_MIN_CAPACITY = 256


def new_cache(
    parts: Sequence[Part], batch_size: int, max_seq_len: int, *, rows: int | None = None
) -> KVCache:
    """One cache for the layers of `parts` (a chain), each layer's buffers on its part's device."""
    shapes = {i: s for p in parts for i, s in p.cache_shapes.items()}
    devices = {i: p.device for p in parts for i in p.cache_shapes}
    dtypes = {i: p.dtype for p in parts for i in p.cache_shapes}
    device = devices if devices else parts[0].device
    dtype = dtypes if dtypes else parts[0].dtype
    return KVCache(shapes, batch_size, max_seq_len, device=device, dtype=dtype, rows=rows)


class IncrementalForward:
    """`f(new_ids, attention_mask=None, rows=None) -> logits`, with `reset()`, `rewind(n)`, `reorder(rows)`,
    `seq_len` and `forward_packed(input_ids, position_ids, tree_mask)`, and the rows protocol of
    docs/forward_func.md (`add_row()`, `remove_row(row)`, `max_rows`) for continuous batching.

    The KV cache is allocated at the first call (its batch size fixes B until `reset()`), or at the first
    `add_row()` with `max_rows` rows of which none in use; it grows by doubling up to `max_seq_len` (default:
    the model's `max_position_embeddings`, times the factor for dynamic NTK RoPE, which exists to go past
    it); past that a call raises `CacheOverflowError`. With rows, each row has its own length: a call with
    `rows=slice(a, b)` sends `new_ids` (b - a, T) after each of those rows' own cached tokens.
    """

    def __init__(self, parts: Sequence[Part], max_seq_len: int | None = None, *, max_rows: int = 8) -> None:
        if not parts:
            raise ValueError("IncrementalForward needs at least one part")
        if not parts[0].spec.begin or not parts[-1].spec.end:
            raise ValueError(
                "a forward_func maps token ids to logits: the first part must hold begin ('b') and the last "
                f"end ('e'); got {[str(p.spec) for p in parts]}"
            )
        self.parts = list(parts)
        self.max_seq_len = int(max_seq_len or _default_max_seq_len(parts[0]))
        if not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be an int >= 1, got {max_rows!r}")
        self.max_rows = max_rows
        self.cache: KVCache | None = None
        self._fixed = False  # the batch size is fixed from the first call after reset()

    @property
    def seq_len(self) -> int:
        return self.cache.seq_len if self.cache is not None and self._fixed else 0

    def reset(self) -> None:
        """Forget everything; the next call starts a new sequence (and may use a new batch size)."""
        if self.cache is not None:
            self.cache.reset()
        self._fixed = False

    def rewind(self, n: int, row: int | None = None) -> None:
        """Drop the last `n` tokens of every row from the cache (or of row `row` only)."""
        if row is not None:
            if self.cache is None or not self._fixed:
                raise ValueError(f"rewind({n}, row={row}): the cache is empty")
            self.cache.rewind(n, row)
            return
        if n < 0 or n > self.seq_len:
            raise ValueError(f"rewind({n}): the cache holds {self.seq_len} tokens")
        if self.cache is not None:
            self.cache.rewind(n)

    # ---- the rows protocol (docs/forward_func.md): rows join and leave between calls ----------------

    @property
    def rows(self) -> int:
        """Rows in use."""
        return self.cache.rows if self.cache is not None and self._fixed else 0

    def add_row(self) -> int:
        """Start a new sequence in a free row (length 0); returns its index. The first call after `reset()`
        allocates a cache of `max_rows` rows; `CacheOverflowError` when all are in use."""
        if self.cache is None or not self._fixed:
            self.cache = new_cache(self.parts, self.max_rows, min(self.max_seq_len, _MIN_CAPACITY), rows=0)
            self._fixed = True
        return self.cache.add_row()

    def remove_row(self, row: int) -> int | None:
        """Retire row `row`: the last row in use moves into its index. Returns that row's old index, or
        None when `row` was the last one. When no row is left, a cache grown past its first capacity is
        freed (the next `add_row()` allocates a small one), so memory returns to its idle level."""
        if self.cache is None or not self._fixed:
            raise ValueError(f"remove_row({row}): no rows are in use")
        moved = self.cache.remove_row(row)
        if self.cache.rows == 0 and self.cache.max_seq_len > _MIN_CAPACITY:
            self.cache, self._fixed = None, False  # idle: a long row's growth is given back
        return moved

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Empty row `dst` starts with row `src`'s first `n` tokens (a shared prompt prefix, computed once)."""
        if self.cache is None or not self._fixed:
            raise ValueError(f"copy_prefix({src}, {dst}, {n}): no rows are in use")
        self.cache.copy_prefix(src, dst, n)

    def _ensure_rows_room(self, rows: slice, batch_size: int, new_tokens: int) -> KVCache:
        cache = self.cache
        if cache is None or not self._fixed:
            raise ValueError("rows=: no rows are in use; call add_row() first")
        r0, r1 = rows.start or 0, cache.rows if rows.stop is None else rows.stop
        if rows.step not in (None, 1) or not 0 <= r0 < r1 <= cache.rows:
            raise ValueError(f"rows={rows} are not rows in use (0..{cache.rows - 1})")
        if r1 - r0 != batch_size:
            raise ValueError(f"new_ids has {batch_size} rows for rows={rows} ({r1 - r0} rows)")
        needed = max(cache.lengths[r0:r1]) + new_tokens
        if needed > self.max_seq_len:
            raise CacheOverflowError(
                f"KV cache overflow: a row holds {needed - new_tokens} tokens + {new_tokens} new > "
                f"max_seq_len={self.max_seq_len}"
            )
        if needed > cache.max_seq_len:
            capacity = min(self.max_seq_len, 1 << (needed - 1).bit_length())
            self.cache = cache = cache.grown(capacity)
        return cache

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i of the cache becomes a copy of old row rows[i] (beam search follows its beams)."""
        if self.cache is None or not self._fixed:
            raise ValueError("reorder: the cache is empty")
        self.cache.reorder(rows)

    def _ensure_room(self, batch_size: int, new_tokens: int) -> KVCache:
        cache = self.cache
        if self._fixed and cache is not None and batch_size != cache.rows:
            raise ValueError(
                f"batch size {batch_size} differs from the {cache.rows} fixed by the first call; call reset() first"
            )
        needed = self.seq_len + new_tokens
        if needed > self.max_seq_len:
            raise CacheOverflowError(
                f"KV cache overflow: {self.seq_len} cached + {new_tokens} new tokens > max_seq_len={self.max_seq_len}"
            )
        if cache is not None and not self._fixed:
            cache.reset()  # a new sequence: tokens an earlier call left go
        if cache is not None and cache.batch_size == batch_size and cache.max_seq_len >= needed:
            cache.rows = batch_size
        else:
            capacity = min(self.max_seq_len, max(_MIN_CAPACITY, 1 << (needed - 1).bit_length()))
            if cache is not None and self._fixed:
                cache = cache.grown(capacity)
            else:
                cache = new_cache(self.parts, batch_size, capacity)
        self.cache, self._fixed = cache, True
        return cache

    def __call__(
        self,
        new_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        rows: slice | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Logits (B, T, V) of the new tokens; `logits_to_keep=n` > 0: of the last n only, (B, n, V)."""
        if new_ids.dim() != 2:
            raise ValueError(f"new_ids must be a LongTensor (B, T), got shape {tuple(new_ids.shape)}")
        with torch.no_grad():  # not inference mode: the cache is updated in place outside it too
            if rows is None:
                cache = self._ensure_room(new_ids.shape[0], new_ids.shape[1])
            else:
                cache = self._ensure_rows_room(rows, new_ids.shape[0], new_ids.shape[1])
        with torch.inference_mode():
            slots = cache.begin(new_ids.shape[1], attention_mask, rows)
            x = new_ids
            for part in self.parts:
                keep = logits_to_keep if part is self.parts[-1] else 0
                x = part(x.to(part.device), cache, slots=slots, logits_to_keep=keep)
            cache.commit(slots)
            return x

    def forward_packed(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, tree_mask: torch.Tensor
    ) -> torch.Tensor:
        """Score several continuations of the cached prefix (row 0) at once; the cache is left as it was."""
        with torch.no_grad():
            cache = self._ensure_room(
                self.cache.rows if self._fixed and self.cache else 1, input_ids.shape[1]
            )
        with torch.inference_mode():
            x = input_ids
            for part in self.parts:
                x = part.forward_packed(x.to(part.device), position_ids, tree_mask, cache)
            return x


def _default_max_seq_len(part: Part) -> int:
    config = part.config
    factor = max(
        (float(r.factor or 1.0) for r in config.rope_parameters.values() if r.rope_type == "dynamic"),
        default=1.0,
    )
    return int(config.max_position_embeddings * factor)
