"""What one pipeline rank holds: `StageInfo` (its description), `Stage` (the description and a factory of
incremental forwards over its part), `PartForward` (one micro-batch's forward over a Part, owning that
micro-batch's `KVCache`), `PartRows` (the rows protocol over a Part: one stage-wide `KVCache` whose rows
join and leave), `StageCaches` (a rank's forwards, one per micro-batch, or its rows), and what the last
rank sends back (`Output`, `select_output`).

Sequence state on a rank has one owner per micro-batch: the `KVCache` its `PartForward` allocated with
`part.new_cache(...)` and passes to every call; the Part itself holds none, so the micro-batches share its
weights without swapping anything in or out. Rank 0's `PipelineDriver.seq_len` is the authoritative length
of the sequence: the ranks' caches follow its calls, rewinds and resets. With rows (continuous
batching) every rank keeps one `KVCache` of `max_rows` rows instead and applies the driver's row moves, so
the rows are the same on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Protocol

import torch

from llm_model_parts.pipeline.transport import PipelineError

if TYPE_CHECKING:
    from llm_model_parts.cache import KVCache
    from llm_model_parts.part import Part


class StageForward(Protocol):
    """One micro-batch's incremental forward over a stage: `f(x, attention_mask=None)`, `reset()`, `rewind(n)`
    (and `forward_packed(x, position_ids, tree_mask)` when the stage is `packed`)."""

    def __call__(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor: ...
    def reset(self) -> None: ...
    def rewind(self, n: int) -> None: ...


class StageRows(Protocol):
    """A stage's rows (continuous batching): `f(x, attention_mask, rows, logits_to_keep=0)` over rows `rows`
    of one cache, `add_row()`, `remove_row(row)`, `rewind(n, row=None)`."""

    def __call__(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None, rows: slice, logits_to_keep: int = 0
    ) -> torch.Tensor: ...
    def add_row(self) -> int: ...
    def remove_row(self, row: int) -> int | None: ...
    def rewind(self, n: int, row: int | None = None) -> None: ...


@dataclass(frozen=True)
class StageInfo:
    """What a rank holds; exchanged at start-up so that a mismatched pipeline fails before any token is sent."""

    spec: str  # "" for a rank 0 that only drives
    begin: bool
    layers: tuple[int, int]  # half-open range, (0, 0) when none
    end: bool
    num_layers: int
    hidden_size: int
    vocab_size: int
    dtype: str  # "float32", ...
    device: str
    max_seq_len: int
    architecture: str = ""

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StageInfo:
        d = dict(d)
        d["layers"] = tuple(d["layers"])
        return cls(**d)

    @classmethod
    def driver_only(cls) -> StageInfo:
        """A rank 0 that holds no part and only drives."""
        return cls("", False, (0, 0), False, 0, 0, 0, "float32", "cpu", 1 << 62)


@dataclass
class Stage:
    """A rank's part: its description and a factory of independent forwards (one per micro-batch) over the
    same weights."""

    info: StageInfo
    new_forward: Callable[[], StageForward]
    module: Any = None  # the Part, kept alive
    packed: bool = False  # the forwards offer forward_packed
    new_rows: Callable[[int], StageRows] | None = None  # rows over max_rows rows; None: no rows protocol


def stage_from_part(part: Part, *, max_seq_len: int, spec: str | None = None) -> Stage:
    """A Stage over an llm_model_parts Part: each micro-batch gets its own KV cache of `max_seq_len` slots."""
    cfg = part.config
    layers = tuple(part.spec.layers)
    info = StageInfo(
        spec=spec if spec is not None else str(part.spec),
        begin=bool(part.spec.begin),
        layers=(layers[0], layers[-1] + 1) if layers else (0, 0),
        end=bool(part.spec.end),
        num_layers=int(cfg.num_hidden_layers),
        hidden_size=int(cfg.hidden_size),
        vocab_size=int(cfg.vocab_size),
        dtype=str(part.dtype).removeprefix("torch."),
        device=str(part.device),
        max_seq_len=max_seq_len,
        architecture=str(getattr(cfg, "model_type", "")),
    )
    return Stage(
        info,
        lambda: PartForward(part, max_seq_len),
        module=part,
        packed=True,
        new_rows=lambda max_rows: PartRows(part, max_seq_len, max_rows),
    )


def load_stage(
    model: str | Any, spec: str, *, device: torch.device, dtype: torch.dtype | None, max_seq_len: int
) -> Stage:
    """Load only the files `spec` needs from `model` and wrap the part as a Stage."""
    from llm_model_parts.part import load_part

    part = load_part(model, spec, device=device, dtype=dtype)
    return stage_from_part(part, max_seq_len=max_seq_len, spec=spec)


class PartForward:
    """One micro-batch's incremental forward over a Part: it owns that micro-batch's `KVCache` and passes it
    to each call. The cache is allocated at the first call (its batch size fixes the rows until `reset()`)."""

    def __init__(self, part: Part, max_seq_len: int) -> None:
        self.part = part
        self.max_seq_len = max_seq_len
        self.cache: KVCache | None = None

    @property
    def seq_len(self) -> int:
        return self.cache.seq_len if self.cache is not None else 0

    def _cache_for(self, batch_size: int) -> KVCache:
        cache = self.cache
        if cache is None or (cache.batch_size != batch_size and cache.seq_len == 0):
            cache = self.cache = self.part.new_cache(batch_size, self.max_seq_len)
        return cache

    def __call__(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            cache = self._cache_for(x.shape[0])
            out: torch.Tensor = self.part(x, cache, attention_mask=attention_mask)
            return out

    def forward_packed(
        self, x: torch.Tensor, position_ids: torch.Tensor, tree_mask: torch.Tensor
    ) -> torch.Tensor:
        """Packed continuations of row 0's cached prefix; the cache is left as it was."""
        with torch.no_grad():
            cache = self._cache_for(x.shape[0])
            return self.part.forward_packed(x, position_ids, tree_mask, cache)

    def reset(self) -> None:
        if self.cache is not None:
            self.cache.reset()

    def rewind(self, n: int) -> None:
        if self.cache is not None:
            self.cache.rewind(n)


_MIN_ROWS_CAPACITY = 256  # slots per row a rows cache starts with (as IncrementalForward's)


class PartRows:
    """The rows protocol over a Part: one `KVCache` of `max_rows` rows (none in use at first), growing by
    doubling up to `max_seq_len` as rows get longer and freed back to its first size when the last row
    leaves. Every rank's PartRows applies the same row moves."""

    def __init__(self, part: Part, max_seq_len: int, max_rows: int) -> None:
        self.part = part
        self.max_seq_len, self.max_rows = max_seq_len, max_rows
        self.cache = self._new_cache()

    def _new_cache(self) -> KVCache:
        return self.part.new_cache(self.max_rows, min(self.max_seq_len, _MIN_ROWS_CAPACITY), rows=0)

    def __call__(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None, rows: slice, logits_to_keep: int = 0
    ) -> torch.Tensor:
        needed = max(self.cache.lengths[rows]) + x.shape[1]
        if self.cache.max_seq_len < needed <= self.max_seq_len:
            self.cache = self.cache.grown(min(self.max_seq_len, 1 << (needed - 1).bit_length()))
        with torch.no_grad():
            slots = self.cache.begin(x.shape[1], attention_mask, rows)
            out: torch.Tensor = self.part(x, self.cache, slots=slots, logits_to_keep=logits_to_keep)
            self.cache.commit(slots)
            return out

    def add_row(self) -> int:
        return self.cache.add_row()

    def remove_row(self, row: int) -> int | None:
        moved = self.cache.remove_row(row)
        if self.cache.rows == 0 and self.cache.max_seq_len > _MIN_ROWS_CAPACITY:
            self.cache = self._new_cache()  # idle: a long row's growth is given back, as IncrementalForward
        return moved

    def rewind(self, n: int, row: int | None = None) -> None:
        self.cache.rewind(n, row)


class StageCaches:
    """A rank's sequence state: one forward (and so one KV cache) per micro-batch, created on first use and
    kept across resets; or, between the first `add_row` after a reset and the next reset, the stage's rows."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.forwards: dict[int, StageForward] = {}
        self.rows: StageRows | None = None

    def get(self, item: int) -> StageForward:
        f = self.forwards.get(item)
        if f is None:
            f = self.forwards[item] = self.stage.new_forward()
        return f

    def forward_packed(
        self, item: int, x: torch.Tensor, position_ids: torch.Tensor, tree_mask: torch.Tensor
    ) -> torch.Tensor:
        f = self.get(item)
        packed = getattr(f, "forward_packed", None)
        if packed is None:
            raise PipelineError(f"this stage ({self.stage.info.spec!r}) does not offer forward_packed")
        out: torch.Tensor = packed(x, position_ids, tree_mask)
        return out

    def add_row(self, max_rows: int) -> int:
        """A new row; the first after a reset allocates the stage's rows (`max_rows` of them)."""
        if self.rows is None:
            if self.stage.new_rows is None:
                raise PipelineError(
                    f"this stage ({self.stage.info.spec!r}) does not speak the rows protocol (add_row)"
                )
            self.rows = self.stage.new_rows(max_rows)
        return self.rows.add_row()

    def in_rows(self, what: str) -> StageRows:
        if self.rows is None:
            raise PipelineError(f"{what}: no rows are in use on this stage ({self.stage.info.spec!r})")
        return self.rows

    def reset(self) -> None:
        for f in self.forwards.values():
            f.reset()
        self.rows = None

    def rewind(self, n: int) -> None:
        if self.rows is not None:
            self.rows.rewind(n)
            return
        for f in self.forwards.values():
            f.rewind(n)

    def clear(self) -> None:
        """Free every cache."""
        self.forwards.clear()
        self.rows = None


def check_input(info: StageInfo, x: torch.Tensor, sender: int) -> None:
    """A readable error when what arrives is not what this stage takes."""
    if info.begin:
        if x.dtype != torch.int64 or x.dim() != 2:
            raise PipelineError(
                f"rank holding {info.spec!r} (begin) expects token ids int64 [B, T], "
                f"rank {sender} sent {x.dtype} {list(x.shape)}"
            )
        return
    if x.dim() != 3 or x.shape[-1] != info.hidden_size or x.dtype != info.torch_dtype:
        raise PipelineError(
            f"rank holding {info.spec!r} expects hidden states {info.dtype} [B, T, {info.hidden_size}], "
            f"rank {sender} sent {str(x.dtype).removeprefix('torch.')} {list(x.shape)}: "
            "do all ranks load the same model with the same dtype?"
        )


OUTPUTS = ("logits", "last", "argmax")


class Output(IntEnum):
    """What the last rank sends back for a micro-batch (a header's `arg`); the first three are `OUTPUTS`."""

    LOGITS = 0
    LAST = 1  # the last position's logits
    ARGMAX = 2  # token ids
    NONE = 3  # nothing: a prefill chunk before the last, when only the last position is wanted


def logits_to_compute(mode: int) -> int:
    """What the part holding end needs to compute for output mode `mode` (HF's logits_to_keep)."""
    return 1 if mode in (Output.LAST, Output.NONE) else 0


def select_output(y: torch.Tensor, mode: int) -> list[torch.Tensor]:
    """The payloads the last rank sends back for its output `y` in output mode `mode`."""
    if mode == Output.LAST:
        return [y[:, -1:]]
    if mode == Output.ARGMAX:
        return [y.argmax(-1)]
    if mode == Output.NONE:
        return []
    return [y]


def output_mode(output: str, logits_to_keep: int | None) -> tuple[int, int]:
    """The output mode for one call (`logits_to_keep` as HF's, None: `output`), and how many last positions to keep of full logits (0: all)."""
    if logits_to_keep is None:
        return OUTPUTS.index(output), 0
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise ValueError(
            f"logits_to_keep must be None (the driver's output={output!r}), 0 (every position), 1 (the last) "
            f"or k > 1 (the last k), got {logits_to_keep!r}"
        )
    if logits_to_keep == 1:
        return Output.LAST, 0
    return Output.LOGITS, logits_to_keep
