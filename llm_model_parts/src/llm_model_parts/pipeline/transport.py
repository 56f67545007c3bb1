"""Messages between pipeline ranks over torch.distributed point-to-point (gloo on CPU, NCCL between GPUs).

Every message is a small int64 header (command, micro-batch, argument, and the dtype and shape of up to
three payload tensors) sent on CPU, followed by its payloads. Headers always travel over gloo, so a dead or
hung peer is noticed at the header with the configured timeout whatever the payload backend; payloads go
over NCCL when both ends compute on CUDA (`backend="cpu:gloo,cuda:nccl"`), else over gloo.

Every blocking wait has a timeout. A peer that exits closes its sockets and the wait fails at once; a
peer that hangs makes it fail after `timeout` seconds. Either way the error names the peer and what to do.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta
from enum import IntEnum
from typing import Any

import torch
import torch.distributed as dist

MAGIC = 0x4C4D5050  # "LMPP"
VERSION = 2  # 2: the rows commands
MAX_PAYLOADS = 3
MAX_DIMS = 3
HEADER_LEN = 8 + MAX_PAYLOADS * (2 + MAX_DIMS)

# Tags keep the two directions apart: commands flow 0 -> 1 -> ... -> n-1, results flow n-1 -> 0.
TAG_DOWN = 0
TAG_RETURN = 1


class Command(IntEnum):
    HELLO = 1  # startup: the stage infos of the ranks so far, as JSON
    FORWARD = 2  # ids or hidden states [+ attention mask] of one micro-batch
    PACKED = 3  # a packed prefix tree: ids or hidden states, position ids, tree mask
    RESET = 4
    REWIND = 5  # arg: number of tokens
    PING = 6  # heartbeat from rank 0; the last rank answers PONG
    PONG = 7
    SHUTDOWN = 8  # the last rank answers SHUTDOWN to rank 0
    ERROR = 9  # payload: the message, utf-8
    RESULT = 10  # last rank -> rank 0: logits / token ids of one micro-batch (arg: output mode)
    # the rows protocol (continuous batching): one stage-wide cache whose rows join and leave
    ADD_ROW = 11  # item: the new row's index, arg: max_rows; the last rank answers ADD_ROW to rank 0
    REMOVE_ROW = 12  # item: the row; the last row in use moves into it
    REWIND_ROW = 13  # item: the row, arg: number of tokens
    ROWS = 14  # ids or hidden states [+ attention mask] of rows item .. item + B (arg: output mode)


_DTYPES: list[torch.dtype] = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
]
_CODE = {dt: i + 1 for i, dt in enumerate(_DTYPES)}


class PipelineError(RuntimeError):
    """The pipeline cannot go on: a rank died, hung, refused a message, or raised."""


class PipelineTimeout(PipelineError):
    """No message from a peer within the timeout."""


class RemoteError(PipelineError):
    """An error raised on another rank, forwarded along the pipeline to this one."""


@dataclass(frozen=True)
class Header:
    command: Command
    item: int = 0  # micro-batch index / first row
    arg: int = 0  # rewind count / output mode / ping number / max_rows
    payloads: tuple[tuple[torch.dtype, tuple[int, ...]], ...] = ()

    def encode(self) -> torch.Tensor:
        if len(self.payloads) > MAX_PAYLOADS:
            raise ValueError(f"a message carries at most {MAX_PAYLOADS} tensors, got {len(self.payloads)}")
        h = torch.zeros(HEADER_LEN, dtype=torch.int64)
        h[:6] = torch.tensor([MAGIC, VERSION, int(self.command), self.item, self.arg, len(self.payloads)])
        for i, (dtype, shape) in enumerate(self.payloads):
            if dtype not in _CODE:
                raise TypeError(f"cannot send a {dtype} tensor; supported: {[str(d) for d in _DTYPES]}")
            if not 1 <= len(shape) <= MAX_DIMS:
                raise ValueError(f"cannot send a tensor of shape {list(shape)}: 1 to {MAX_DIMS} dimensions")
            base = 8 + i * (2 + MAX_DIMS)
            h[base] = _CODE[dtype]
            h[base + 1] = len(shape)
            h[base + 2 : base + 2 + len(shape)] = torch.tensor(shape)
        return h

    @classmethod
    def decode(cls, h: torch.Tensor, *, peer: int) -> Header:
        v = h.tolist()
        if v[0] != MAGIC:
            raise PipelineError(
                f"rank {peer} sent a message that is not a pipeline header (magic {v[0]:#x}); "
                "is every rank running llm_model_parts.pipeline?"
            )
        if v[1] != VERSION:
            raise PipelineError(f"rank {peer} speaks pipeline protocol version {v[1]}, this rank {VERSION}")
        try:
            command = Command(v[2])
        except ValueError:
            raise PipelineError(f"rank {peer} sent unknown command {v[2]}") from None
        if not 0 <= v[5] <= MAX_PAYLOADS:
            raise PipelineError(
                f"rank {peer} sent a corrupt header ({v[5]} payloads, at most {MAX_PAYLOADS})"
            )
        payloads = []
        for i in range(v[5]):
            base = 8 + i * (2 + MAX_DIMS)
            code, ndim = v[base], v[base + 1]
            if not 1 <= code <= len(_DTYPES) or not 1 <= ndim <= MAX_DIMS:
                raise PipelineError(
                    f"rank {peer} sent a corrupt header (payload {i}: dtype {code}, ndim {ndim})"
                )
            shape = tuple(v[base + 2 : base + 2 + ndim])
            if any(d < 0 for d in shape):
                raise PipelineError(f"rank {peer} sent a corrupt header (payload {i}: shape {list(shape)})")
            payloads.append((_DTYPES[code - 1], shape))
        return cls(command, v[3], v[4], tuple(payloads))


def _explain(e: BaseException, peer: int, what: str, timeout: float) -> PipelineError:
    text = str(e)
    low = text.lower()
    if "timed out" in low or "timeout" in low:
        return PipelineTimeout(
            f"{what}: nothing from rank {peer} within {timeout:g} s; rank {peer} (or one before it) hung, "
            f"died, or computes longer than the timeout (raise it with timeout=/--timeout). [{text.strip()[:200]}]"
        )
    if "closed" in low or "reset by peer" in low or "broken pipe" in low or "connection" in low:
        return PipelineError(f"{what}: rank {peer} closed the connection: it exited or crashed (see its log)")
    return PipelineError(f"{what} with rank {peer} failed: {text.strip()[:500]}")


@dataclass
class Link:
    """One direction between this rank and `peer`: sends (non-blocking) or receives (blocking, with timeout)."""

    peer: int
    tag: int
    timeout: float  # seconds
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where payloads travel
    group: Any = None
    max_pending: int = 64
    _pending: deque[tuple[Any, list[torch.Tensor], float]] = field(default_factory=deque)

    # --- sending ---------------------------------------------------------------------------------------

    def send(self, header: Header, tensors: tuple[torch.Tensor, ...] | list[torch.Tensor] = ()) -> None:
        """Queue `header` and `tensors` for `peer`; returns once they are handed to the backend."""
        tensors = [t.detach().to(self.device).contiguous() for t in tensors]
        header = Header(
            header.command, header.item, header.arg, tuple((t.dtype, tuple(t.shape)) for t in tensors)
        )
        encoded = header.encode()
        works = [dist.isend(encoded, self.peer, group=self.group, tag=self.tag)]
        works += [dist.isend(t, self.peer, group=self.group, tag=self.tag) for t in tensors]
        now = time.monotonic()
        for w in works:
            self._pending.append((w, [encoded, *tensors], now))  # keep the tensors alive until sent
        self._reap()
        while len(self._pending) > self.max_pending:
            self._wait_oldest()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until `peer` has received everything queued."""
        while self._pending:
            self._wait_oldest(timeout)

    def _reap(self) -> None:
        while self._pending and self._pending[0][0].is_completed():
            w = self._pending.popleft()[0]
            self._wait(w, self.timeout, "send")  # surfaces a failed send

    def _wait_oldest(self, timeout: float | None = None) -> None:
        w = self._pending.popleft()[0]
        self._wait(w, self.timeout if timeout is None else timeout, "send")

    # --- receiving -------------------------------------------------------------------------------------

    def recv(self, timeout: float | None = None) -> tuple[Header, list[torch.Tensor]]:
        """The next message from `peer` (header, payloads on `self.device`)."""
        timeout = self.timeout if timeout is None else timeout
        h = torch.empty(HEADER_LEN, dtype=torch.int64)
        self._wait(dist.irecv(h, self.peer, group=self.group, tag=self.tag), timeout, "receive")
        header = Header.decode(h, peer=self.peer)
        tensors = []
        for dtype, shape in header.payloads:
            t = torch.empty(shape, dtype=dtype, device=self.device)
            self._wait(dist.irecv(t, self.peer, group=self.group, tag=self.tag), timeout, "receive")
            tensors.append(t)
        return header, tensors

    def _wait(self, work: Any, timeout: float, what: str) -> None:
        try:
            work.wait(timedelta(seconds=timeout))
        except RuntimeError as e:
            raise _explain(e, self.peer, f"{what} (tag {self.tag})", timeout) from e


# --- small helpers for structured payloads -----------------------------------------------------------------


def encode_json(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)


def decode_json(t: torch.Tensor) -> Any:
    return json.loads(bytes(t.cpu().tolist()).decode())


def encode_text(text: str) -> torch.Tensor:
    data = text.encode()[:65536] or b" "
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_text(tensors: list[torch.Tensor]) -> str:
    return bytes(tensors[0].cpu().tolist()).decode(errors="replace") if tensors else "(no message)"


def link_device(a: str, b: str) -> torch.device:
    """Where payloads between ranks computing on devices `a` and `b` travel: over NCCL (CUDA tensors) only
    when both ends compute on CUDA, else on the CPU over gloo."""
    if a.startswith("cuda") and b.startswith("cuda"):
        return torch.device(a)
    return torch.device("cpu")
