"""What one pipeline rank holds (`Stage`, `StageInfo`), caches over a Part per micro-batch, and the start-up
handshake in which every rank learns and checks what the others hold."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from llm_model_parts.transport import (
    TAG_DOWN,
    TAG_RETURN,
    Command,
    Header,
    Link,
    PipelineError,
    RemoteError,
    decode_json,
    decode_text,
    encode_json,
    encode_text,
)


class StageForward(Protocol):
    """One KV cache over a part: `f(x, attention_mask=None)`, `reset()`, `rewind(n)`."""

    def __call__(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor: ...
    def reset(self) -> None: ...
    def rewind(self, n: int) -> None: ...


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


@dataclass
class Stage:
    """A rank's part: its description and a factory of independent caches over the same weights."""

    info: StageInfo
    new_forward: Callable[[], StageForward]
    module: Any = None  # the Part, kept alive
    packed: bool = False  # the caches offer forward_packed


def stage_from_part(part: Any, *, max_seq_len: int, spec: str | None = None) -> Stage:
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
    return Stage(info, lambda: PartCache(part, max_seq_len), module=part, packed=True)


class PartCache:
    """An incremental forward over a Part with a KV cache of its own, so that several micro-batches share the
    part's weights: the cache is swapped into the part for the length of each call."""

    def __init__(self, part: Any, max_seq_len: int) -> None:
        self.part = part
        self.max_seq_len = max_seq_len
        self.cache: Any = None

    @property
    def seq_len(self) -> int:
        return int(self.cache.seq_len) if self.cache is not None else 0

    def _bind(self, batch_size: int) -> None:
        if self.cache is None or (self.cache.batch_size != batch_size and self.cache.seq_len == 0):
            saved = self.part.cache
            self.part.setup_cache(batch_size, self.max_seq_len)
            self.cache, self.part.cache = self.part.cache, saved
        self.part.cache = self.cache

    def __call__(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self._bind(x.shape[0])
        try:
            with torch.no_grad():
                return self.part(x, attention_mask=attention_mask)
        finally:
            self.part.cache = None

    def forward_packed(
        self, x: torch.Tensor, position_ids: torch.Tensor, tree_mask: torch.Tensor
    ) -> torch.Tensor:
        self._bind(x.shape[0])
        try:
            with torch.no_grad():
                return self.part.forward_packed(x, position_ids, tree_mask)
        finally:
            self.part.cache = None

    def reset(self) -> None:
        if self.cache is not None:
            self.cache.reset()

    def rewind(self, n: int) -> None:
        if self.cache is not None:
            self.cache.rewind(n)


# --- start-up ------------------------------------------------------------------------------------------------


def _check_chain(infos: list[StageInfo], *, complete: bool) -> None:
    """Ranks 0..k must hold begin, then consecutive layers, then end, with one hidden size and dtype."""
    held = [(r, i) for r, i in enumerate(infos) if i.spec]
    if not held:
        raise PipelineError("no rank holds any part of the model")
    r0, first = held[0]
    if not first.begin:
        raise PipelineError(f"rank {r0} holds {first.spec!r}, the first part, but not begin ('b')")
    expect = 0
    for r, info in held:
        for what, mine, theirs in (
            ("architecture", info.architecture, first.architecture),
            ("num_layers", info.num_layers, first.num_layers),
            ("hidden_size", info.hidden_size, first.hidden_size),
            ("dtype", info.dtype, first.dtype),
        ):
            if mine != theirs:
                raise PipelineError(
                    f"rank {r} ({info.spec!r}) has {what}={mine} but rank {r0} ({first.spec!r}) has {what}={theirs}: "
                    "every rank must load the same model with the same --dtype"
                )
        if info.begin and r != r0:
            raise PipelineError(f"rank {r} ({info.spec!r}) holds begin ('b'), which rank {r0} holds already")
        if info.layers != (0, 0):
            if info.layers[0] != expect:
                prev = f"the layers before it end at {expect}" if expect else "no rank before it holds layers"
                raise PipelineError(
                    f"rank {r} holds {info.spec!r}, starting at layer {info.layers[0]}, but {prev}: "
                    "each rank must start where the previous one stopped"
                )
            expect = info.layers[1]
        if info.end and r != len(infos) - 1 and complete:
            raise PipelineError(f"rank {r} ({info.spec!r}) holds end ('e') but is not the last rank")
    if complete:
        last = infos[-1]
        if expect != first.num_layers:
            raise PipelineError(
                f"the ranks hold layers 0-{expect} of {first.num_layers}: layers {expect}-{first.num_layers} are missing"
            )
        if not last.end:
            raise PipelineError(f"the last rank ({len(infos) - 1}, {last.spec!r}) must hold end ('e')")


def handshake(info: StageInfo, rank: int, world: int, *, timeout: float) -> list[StageInfo]:
    """Every rank learns every rank's StageInfo; each checks the chain so far, so a bad plan fails at start-up.

    Pass 1 carries the infos down the ranks and back to rank 0, pass 2 carries the complete list down.
    """
    down = Link(rank + 1, TAG_DOWN, timeout) if rank < world - 1 else None
    up = Link(rank - 1, TAG_DOWN, timeout) if rank > 0 else None
    out = down if down is not None else Link(0, TAG_RETURN, timeout)
    infos: list[StageInfo] = []
    if up is not None:
        infos = _recv_infos(up, out)
    infos.append(info)
    error = None
    try:
        _check_chain(infos, complete=rank == world - 1)
    except PipelineError as e:
        error = f"rank {rank} at start-up: {e}"
    if error is not None:
        out.send(Header(Command.ERROR), [encode_text(error)])
        out.flush(min(timeout, 5.0))
        raise PipelineError(error)
    out.send(Header(Command.HELLO), [encode_json([asdict(i) for i in infos])])
    out.flush()
    if rank == 0:
        infos = _recv_infos(Link(world - 1, TAG_RETURN, timeout), None)
        if down is not None:
            down.send(Header(Command.HELLO), [encode_json([asdict(i) for i in infos])])
            down.flush()
    elif up is not None:
        infos = _recv_infos(up, down)
        if down is not None:
            down.send(Header(Command.HELLO), [encode_json([asdict(i) for i in infos])])
            down.flush()
    return infos


def _recv_infos(link: Link, down: Link | None) -> list[StageInfo]:
    header, tensors = link.recv()
    if header.command == Command.ERROR:
        msg = decode_text(tensors)
        if down is not None:
            down.send(Header(Command.ERROR), [encode_text(msg)])
            down.flush(min(link.timeout, 5.0))
        raise RemoteError(msg)
    if header.command != Command.HELLO:
        raise PipelineError(f"rank {link.peer} sent {header.command.name} at start-up, expected HELLO")
    return [StageInfo.from_json(d) for d in decode_json(tensors[0])]


def _link_device(a: str, b: str) -> torch.device:
    """Payloads go over NCCL (CUDA tensors) only when both ends compute on CUDA."""
    if a.startswith("cuda") and b.startswith("cuda"):
        return torch.device(a)
    return torch.device("cpu")


OUTPUTS = ("logits", "last", "argmax")
_OUT_LOGITS, _OUT_LAST, _OUT_ARGMAX, _OUT_NONE = 0, 1, 2, 3


class _Caches:
    """One incremental forward per micro-batch, created on first use and kept across resets."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.forwards: dict[int, StageForward] = {}

    def get(self, item: int) -> StageForward:
        f = self.forwards.get(item)
        if f is None:
            f = self.forwards[item] = self.stage.new_forward()
        return f

    def reset(self) -> None:
        for f in self.forwards.values():
            f.reset()

    def rewind(self, n: int) -> None:
        for f in self.forwards.values():
            f.rewind(n)


def _check_input(info: StageInfo, x: torch.Tensor, sender: int) -> None:
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


def _select(y: torch.Tensor, mode: int) -> list[torch.Tensor]:
    if mode == _OUT_LAST:
        return [y[:, -1:]]
    if mode == _OUT_ARGMAX:
        return [y.argmax(-1)]
    if mode == _OUT_NONE:
        return []
    return [y]


def load_stage(
    model: str | Any, spec: str, *, device: torch.device, dtype: torch.dtype | None, max_seq_len: int
) -> Stage:
    """Load only the files `spec` needs from `model` and wrap the part as a Stage."""
    from llm_model_parts.part import load_part

    part = load_part(model, spec, device=device, dtype=dtype)
    return stage_from_part(part, max_seq_len=max_seq_len, spec=spec)
