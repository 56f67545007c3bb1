"""The start-up handshake: every rank learns and checks what the others hold (`handshake`, `check_chain`), so
that a pipeline planned or launched wrong fails before any token is sent."""

from __future__ import annotations

from dataclasses import asdict

from llm_model_parts.pipeline.stage import StageInfo
from llm_model_parts.pipeline.transport import (
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


def check_chain(infos: list[StageInfo], *, complete: bool) -> None:
    """Ranks 0..k must hold begin, then consecutive layers, then end, with one hidden size and dtype.
    `complete`: `infos` covers every rank (so the layers must all be there and the last rank hold end)."""
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
        check_chain(infos, complete=rank == world - 1)
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
