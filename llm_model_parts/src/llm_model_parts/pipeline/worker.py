"""The loop every rank but 0 runs (`run_worker`): receive from rank r-1, run this rank's part on the micro-batch's
own cache (or on its rows of the stage-wide rows cache), send to r+1 (or back to rank 0 from the last rank)."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from llm_model_parts.pipeline.handshake import handshake
from llm_model_parts.pipeline.stage import Stage, StageCaches, check_input, logits_to_compute, select_output
from llm_model_parts.pipeline.transport import (
    TAG_DOWN,
    TAG_RETURN,
    Command,
    Header,
    Link,
    PipelineError,
    RemoteError,
    decode_text,
    encode_text,
    link_device,
)

logger = logging.getLogger(__name__)


def run_worker(
    stage: Stage,
    *,
    rank: int | None = None,
    world: int | None = None,
    timeout: float = 60.0,
    startup_timeout: float | None = None,
) -> None:
    """Serve one stage of the pipeline (any rank but 0) until rank 0 shuts it down.

    Raises PipelineError when a neighbour dies, hangs past `timeout`, or sends something this stage cannot
    take; before raising it tells the ranks downstream (and so rank 0) what happened.
    """
    rank = dist.get_rank() if rank is None else rank
    world = dist.get_world_size() if world is None else world
    if rank == 0:
        raise ValueError("run_worker serves ranks 1..n-1; rank 0 drives the pipeline with PipelineDriver")
    infos = handshake(stage.info, rank, world, timeout=startup_timeout or timeout)
    last = rank == world - 1
    me = stage.info.device
    inbox = Link(rank - 1, TAG_DOWN, timeout, link_device(me, infos[rank - 1].device))
    nxt = 0 if last else rank + 1
    outbox = Link(nxt, TAG_RETURN if last else TAG_DOWN, timeout, link_device(me, infos[nxt].device))
    caches = StageCaches(stage)
    device = torch.device(stage.info.device)
    logger.info("rank %d serving %r on %s", rank, stage.info.spec, device)
    try:
        _serve(stage, caches, inbox, outbox, device, rank, last)
    except PipelineError as e:
        _tell_downstream(outbox, f"rank {rank} ({stage.info.spec!r}): {e}", e)
        raise
    except Exception as e:
        msg = f"rank {rank} ({stage.info.spec!r}) raised {type(e).__name__}: {e}"
        _tell_downstream(outbox, msg, e)
        raise PipelineError(msg) from e
    finally:
        caches.clear()


def _tell_downstream(outbox: Link, msg: str, cause: BaseException) -> None:
    if isinstance(cause, RemoteError):
        msg = str(cause)  # already says where it came from
    try:
        outbox.send(Header(Command.ERROR), [encode_text(msg)])
        outbox.flush(min(outbox.timeout, 5.0))
    except PipelineError:
        pass  # the downstream rank is gone too; its neighbours will notice


def _serve(
    stage: Stage, caches: StageCaches, inbox: Link, outbox: Link, device: torch.device, rank: int, last: bool
) -> None:
    info = stage.info
    while True:
        header, tensors = inbox.recv()
        cmd = header.command
        if cmd == Command.FORWARD:
            x = tensors[0].to(device)
            check_input(info, x, inbox.peer)
            mask = tensors[1].to(device).long() if len(tensors) > 1 else None
            y = caches.get(header.item)(x, attention_mask=mask)
            if last:
                outbox.send(Header(Command.RESULT, header.item, header.arg), select_output(y, header.arg))
            else:
                outbox.send(Header(Command.FORWARD, header.item, header.arg), [y, *tensors[1:]])
        elif cmd == Command.PACKED:
            x = tensors[0].to(device)
            check_input(info, x, inbox.peer)
            pos, tree = tensors[1].to(device), tensors[2].to(device).bool()
            y = caches.forward_packed(header.item, x, pos, tree)
            if last:
                outbox.send(Header(Command.RESULT, header.item, header.arg), select_output(y, header.arg))
            else:
                outbox.send(Header(Command.PACKED, header.item, header.arg), [y, *tensors[1:]])
        elif cmd == Command.ROWS:
            x = tensors[0].to(device)
            check_input(info, x, inbox.peer)
            mask = tensors[1].to(device).long() if len(tensors) > 1 else None
            rows = slice(header.item, header.item + x.shape[0])
            y = caches.in_rows("a rows call")(x, mask, rows, logits_to_compute(header.arg))
            if last:
                outbox.send(Header(Command.RESULT, header.item, header.arg), select_output(y, header.arg))
            else:
                outbox.send(Header(Command.ROWS, header.item, header.arg), [y, *tensors[1:]])
        elif cmd == Command.ADD_ROW:
            row = caches.add_row(header.arg)
            if row != header.item:
                raise PipelineError(f"add_row gave row {row} here but row {header.item} on rank 0")
            outbox.send(header)  # the last rank's answers rank 0: every rank has the row
        elif cmd in (Command.RESET, Command.REWIND, Command.REMOVE_ROW, Command.REWIND_ROW):
            _apply(caches, header)
            if not last:
                outbox.send(header)
        elif cmd == Command.PING:
            outbox.send(Header(Command.PONG if last else Command.PING, arg=header.arg))
        elif cmd == Command.SHUTDOWN:
            outbox.send(header)
            outbox.flush()
            logger.info("rank %d: shut down by rank 0", rank)
            return
        elif cmd == Command.ERROR:
            raise RemoteError(decode_text(tensors))
        else:
            raise PipelineError(f"rank {rank}: unexpected command {cmd.name} from rank {inbox.peer}")


def _apply(caches: StageCaches, header: Header) -> None:
    """A command that moves sequence state and has no answer."""
    if header.command == Command.RESET:
        caches.reset()
    elif header.command == Command.REWIND:
        caches.rewind(header.arg)
    elif header.command == Command.REMOVE_ROW:
        caches.in_rows("remove_row").remove_row(header.item)
    else:
        caches.in_rows("rewind(row=)").rewind(header.arg, header.item)
