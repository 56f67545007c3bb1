"""The continuous-batching engine: one background thread owns the model and runs every request.

Each iteration it (a) retires finished and cancelled rows and admits queued jobs up to the row cap (all the
rows of the jobs admitted together form one prefill group, left-padded to one length), (b) runs one chunk
of at most `prefill_chunk` tokens per row of that group, (c) runs one decode step for every running row, and
(d) samples each row with its own parameters (llm_sampler.batch), streams the tokens out and marks finished
rows. The model is reached through the rows protocol of docs/forward_func.md (`add_row`, `remove_row`,
`__call__(new_ids, attention_mask=, rows=)`, `max_rows`). A forward_func without it is wrapped: a stateless
one re-sends each row's whole sequence (`StatelessRows`, rows still batch); an incremental one with
`reset`/`rewind` only serves one row at a time (`OneRowAtATime`).

Rows that finish while a prefill group is still joining stay in the batch until it has joined (they are
fed their last token again and, when the forward_func can, rewound by it), so that the running rows stay
rows 0..k-1 and the group rows k..: every call is over a contiguous slice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from llm_sampler.batch import RowError, RowToken, SamplingRow, sample_rows
from llm_sampler.forward import is_incremental

logger = logging.getLogger("llm_sampler.server")
# A joining group's shared prefix is computed once when that saves at least this many row-tokens: below it,
# the extra one-row call costs more than it saves
MIN_SHARED_TOKENS = 64


class QueueFull(RuntimeError):
    """The engine's queue holds `max_queue` jobs already (the server answers 429)."""


@dataclass
class PromptToken:
    """One prompt token's log-probability given the tokens before it (None for the first), whether it is
    the model's greedy choice there, and its `top` alternatives."""

    token: int
    logprob: float | None
    greedy: bool
    top: list[tuple[int, float]] | None = None


@dataclass
class Event:
    """What the engine tells a job: kind "token" (choice, token), "prompt" (the prompt's log-probabilities),
    "done" (choice, finish_reason) or "error" (message; the job is over)."""

    kind: str
    choice: int = 0
    token: RowToken | None = None
    prompt: list[PromptToken] | None = None
    finish_reason: str | None = None
    message: str | None = None


@dataclass
class Job:
    """One request: `rows` (one `SamplingRow` per choice, all over `prompt`), `prompt_logprobs` (None, or
    0 / k: the prompt's log-probabilities and top k), `emit` (called on the engine thread with each
    `Event`; it must not block)."""

    id: str
    prompt: list[int]
    rows: list[SamplingRow]
    emit: Callable[[Event], None]
    prompt_logprobs: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    remaining: int = 0
    failed: bool = False

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Slot:
    job: Job
    choice: int
    row: SamplingRow
    last: int  # the last token fed or chosen
    done: bool = False


@dataclass
class _Group:
    """Rows [first, first + len(slots)) joining together: their prompts left-padded to `ids` (R, W).

    With a `prefix` (1, n) that every prompt starts with, that prefix is prefilled in row `first` alone and
    copied into the other rows; `ids` then holds what follows it, and `mask` covers both."""

    first: int
    slots: list[_Slot]
    ids: torch.Tensor
    mask: torch.Tensor | None
    offsets: list[int]  # where each row's prompt (or its part after the prefix) starts in its padded row
    pos: int = 0
    prefix: torch.Tensor | None = None
    prefix_pos: int = 0
    shared: int = 0  # the prefix's length


class Engine:
    """`Engine(forward_func, max_rows=8, max_queue=64, prefill_chunk=128)`; `submit(job)` from any thread,
    `start()` / `stop()` the model thread."""

    def __init__(
        self,
        forward_func: Any,
        *,
        max_rows: int = 8,
        max_queue: int = 64,
        prefill_chunk: int = 128,
        max_seq_len: int | None = None,
        admit_wait: float = 0.0,
    ) -> None:
        self.f = as_rows(forward_func, max_rows)
        self.max_rows = min(max_rows, int(getattr(self.f, "max_rows", max_rows)))
        self.max_queue, self.prefill_chunk = max_queue, prefill_chunk
        self.admit_wait = admit_wait
        self.max_seq_len = max_seq_len or getattr(self.f, "max_seq_len", None)
        self.can_rewind_row = _takes_row(self.f)
        self.keeps_logits = _takes(self.f, "logits_to_keep")
        self.can_copy_prefix = callable(getattr(self.f, "copy_prefix", None))
        self.queue: deque[Job] = deque()
        self.slots: list[_Slot] = []
        self.group: _Group | None = None
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.running = False
        self.iterations = 0
        # whether requests overlapped since the engine was last idle: only then does an idle engine wait
        # admit_wait for companions (one client's requests, back to back, are admitted at once)
        self.overlapped = True

    # ---- the public side (any thread) --------------------------------------------------------------

    def submit(self, job: Job) -> None:
        if len(job.rows) > self.max_rows:
            raise ValueError(
                f"n={len(job.rows)} needs more rows than the server runs at once ({self.max_rows})"
            )
        with self.cond:
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"the queue holds {self.max_queue} requests; retry later")
            job.remaining = len(job.rows)
            self.queue.append(job)
            self.cond.notify()

    def start(self) -> None:
        """Run the model loop on a new thread (nothing when it runs already, on any thread)."""
        with self.cond:
            if self.thread is not None or self.running:
                return
            self.running = True
        self.thread = threading.Thread(target=self._loop, name="llm_sampler-engine", daemon=True)
        self.thread.start()

    def run(self, ready: Callable[[], None] | None = None) -> None:
        """Run the model loop on the calling thread until `stop()` (from any thread). `ready()` is called
        once the loop holds the engine, so that a `stop()` from what it starts is never lost."""
        with self.cond:
            if self.thread is not None or self.running:
                raise RuntimeError("the engine runs already")
            self.running = True
        if ready is not None:
            ready()
        self._loop()

    def stop(self) -> None:
        with self.cond:
            self.running = False
            self.cond.notify()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=30)
            self.thread = None

    @property
    def busy_rows(self) -> int:
        return len(self.slots)

    @property
    def queued(self) -> int:
        return len(self.queue)

    # ---- the model thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self.cond:
                    while self.running and not self.queue and not self.slots:
                        self.cond.wait()
                    if not self.running:
                        break
                try:
                    self._iterate()
                except Exception as e:  # never let one request take the server down
                    logger.exception("engine iteration failed; failing the requests it held")
                    self._fail_all(f"internal error: {type(e).__name__}: {e}")
        finally:  # also a KeyboardInterrupt on the thread that runs the loop
            self.running = False
            self._fail_all("the server is shutting down")

    def _iterate(self) -> None:
        self.iterations += 1
        if self.group is None:
            self._retire()
            self._admit()
        with torch.no_grad():
            if self.group is not None:
                self._prefill_chunk()
            self._decode()

    def _retire(self) -> None:
        for r in range(len(self.slots) - 1, -1, -1):
            s = self.slots[r]
            if s.done or s.job.cancelled.is_set() or s.job.failed:
                if not s.done:
                    self._finish(s, None)
                moved = self.f.remove_row(r)
                if moved is not None:
                    self.slots[r] = self.slots[moved]
                self.slots.pop()

    def _admit(self) -> None:
        jobs: list[Job] = []
        with self.cond:
            if not self.slots and self.queue:  # idle: gather a wave only if the last busy time had one
                if self.admit_wait > 0 and self.overlapped:
                    self._gather_arrivals()
                self.overlapped = False
            while (
                self.queue
                and len(self.slots) + sum(len(j.rows) for j in jobs) + len(self.queue[0].rows)
                <= self.max_rows
            ):
                job = self.queue.popleft()
                if job.cancelled.is_set():
                    self._log(job, "cancelled")
                    continue
                jobs.append(job)
            if self.queue or (jobs and (self.slots or len(jobs) > 1)):  # a request met another
                self.overlapped = True
        if not jobs:
            return
        new: list[_Slot] = []
        for job in jobs:
            for c, row in enumerate(job.rows):
                new.append(_Slot(job, c, row, job.prompt[-1]))
        first = -1
        for i in range(len(new)):
            r = self.f.add_row()
            first = r if i == 0 else first
        self.slots.extend(new)
        shared = self._shared_prefix(new)
        rests = [s.job.prompt[shared:] for s in new]
        width = max(len(r) for r in rests)
        offsets = [width - len(r) for r in rests]
        ids = torch.tensor([[0] * o + r for o, r in zip(offsets, rests, strict=True)])
        mask = None
        if any(offsets):
            mask = torch.tensor([[1] * shared + [0] * o + [1] * (width - o) for o in offsets])
        prefix = torch.tensor([new[0].job.prompt[:shared]]) if shared else None
        self.group = _Group(first, new, ids, mask, offsets, prefix=prefix, shared=shared)
        logger.debug(
            "prefill group: %d rows joining %d running, width %d, shared prefix %d",
            len(new),
            first,
            width,
            shared,
        )

    def _shared_prefix(self, new: list[_Slot]) -> int:
        """How many leading tokens every prompt of a joining group shares (a chat template's system prompt,
        the n choices of one request), when computing them once saves more than the extra call costs."""
        if len(new) < 2 or not self.can_copy_prefix or any(s.job.prompt_logprobs is not None for s in new):
            return 0
        prompts = [s.job.prompt for s in new]
        limit = min(len(p) for p in prompts) - 1  # each row keeps a token of its own: its logits start it
        n = 0
        while n < limit and all(p[n] == prompts[0][n] for p in prompts):
            n += 1
        return n if (len(new) - 1) * n >= MIN_SHARED_TOKENS else 0

    def _gather_arrivals(self) -> None:
        """An idle engine gathers requests that arrive together (a wave of clients) into one prefill group,
        rather than the first alone and the others after it: it admits once `admit_wait` s pass with no new
        request, or the rows are full (so at most `max_rows` such waits). It waits only when requests
        overlapped in its last busy time: a lone client's requests do not pay `admit_wait` each."""
        seen = sum(len(j.rows) for j in self.queue)
        deadline = time.monotonic() + self.admit_wait
        while self.running and seen < self.max_rows:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.cond.wait(left)
            rows = sum(len(j.rows) for j in self.queue)
            if rows > seen:  # another arrival: wait for one more quiet gap
                seen, deadline = rows, time.monotonic() + self.admit_wait

    def _prefill_chunk(self) -> None:
        g = self.group
        assert g is not None
        if g.prefix is not None:
            self._prefill_prefix(g)
            return
        width = g.ids.shape[1]
        end = min(width, g.pos + max(1, self.prefill_chunk))
        rows = slice(g.first, g.first + len(g.slots))
        kwargs: dict[str, Any] = {} if g.mask is None else {"attention_mask": g.mask[:, : g.shared + end]}
        if self.keeps_logits:  # the head over the last position only, unless a prompt's logprobs are wanted
            kwargs["logits_to_keep"] = 0 if any(s.job.prompt_logprobs is not None for s in g.slots) else 1
        try:
            logits = self.f(g.ids[:, g.pos : end], rows=rows, **kwargs)
        except Exception as e:
            self._prefill_failed(g, e)
            return
        if logits.dim() == 2:
            logits = logits[:, None]
        self._prompt_logprobs(g, logits, g.pos, end)
        g.pos = end
        if end < width:
            return
        self.group = None
        live = [i for i, s in enumerate(g.slots) if not s.done and not s.row.finished]
        self._sample([g.slots[i] for i in live], logits[live, -1])
        for s in g.slots:
            if s.row.finished and not s.done:  # max_tokens=0: nothing to generate
                self._finish(s, "length")

    def _prefill_prefix(self, g: _Group) -> None:
        """One chunk of the group's shared prefix in row `first`; at its end, the copies into the others."""
        assert g.prefix is not None
        n = g.prefix.shape[1]
        end = min(n, g.prefix_pos + max(1, self.prefill_chunk))
        kwargs = {"logits_to_keep": 1} if self.keeps_logits else {}
        try:
            self.f(g.prefix[:, g.prefix_pos : end], rows=slice(g.first, g.first + 1), **kwargs)
            if end == n:
                for r in range(g.first + 1, g.first + len(g.slots)):
                    self.f.copy_prefix(g.first, r, n)
        except Exception as e:
            self._prefill_failed(g, e)
            return
        g.prefix_pos = end
        if end == n:
            g.prefix = None

    def _prefill_failed(self, g: _Group, e: Exception) -> None:
        logger.exception("prefill failed")
        for s in g.slots:
            self._fail(s.job, f"prefill failed: {type(e).__name__}: {e}")
        self.group = None

    def _prompt_logprobs(self, g: _Group, logits: torch.Tensor, start: int, end: int) -> None:
        for i, s in enumerate(g.slots):
            k = s.job.prompt_logprobs
            if k is None or s.choice != 0 or s.done:
                continue
            if logits.shape[1] != end - start:
                self._fail(s.job, "this model returns the last position's logits only: no prompt logprobs")
                continue
            offset = g.offsets[i]
            tokens: list[PromptToken] = []
            if start <= offset < end:
                tokens.append(PromptToken(s.job.prompt[0], None, False))
            lo = max(start, offset)  # logits at padded position j predict token j + 1
            hi = min(end, g.ids.shape[1] - 1)
            if hi > lo:
                lp = logits[i, lo - start : hi - start].float().log_softmax(-1)  # (n, V)
                target = g.ids[i, lo + 1 : hi + 1].to(lp.device)
                chosen = lp.gather(1, target[:, None])[:, 0].tolist()
                greedy = (lp.argmax(-1) == target).tolist()
                tops: list[list[tuple[int, float]] | None] = [None] * len(chosen)
                if k:
                    v, ix = lp.topk(k)
                    tops = [
                        list(zip(a, b, strict=True)) for a, b in zip(ix.tolist(), v.tolist(), strict=True)
                    ]
                for t, c, gr, top in zip(target.tolist(), chosen, greedy, tops, strict=True):
                    tokens.append(PromptToken(t, c, bool(gr), top))
            if tokens:
                s.job.emit(Event("prompt", 0, prompt=tokens))

    def _decode(self) -> None:
        n = self.group.first if self.group is not None else len(self.slots)
        if n == 0:
            return
        running = self.slots[:n]
        for s in running:
            if s.job.cancelled.is_set() and not s.done:
                self._finish(s, None)
            elif not s.done:
                s.row.prepare()
        if all(s.done or s.row.finished for s in running):
            return
        ids = torch.tensor([[s.last] for s in running])
        try:
            logits = self.f(ids, rows=slice(0, n), **({"logits_to_keep": 1} if self.keeps_logits else {}))
        except Exception as e:
            logger.exception("decode step failed")
            for s in running:
                self._fail(s.job, f"decode failed: {type(e).__name__}: {e}")
            return
        if logits.dim() == 3:
            logits = logits[:, -1]
        for r, s in enumerate(running):
            if (s.done or s.row.finished) and self.can_rewind_row:
                self.f.rewind(1, row=r)  # a finished row waiting to leave keeps its length
        live = [i for i, s in enumerate(running) if not s.done and not s.row.finished]
        self._sample([running[i] for i in live], logits[live])

    def _sample(self, slots: list[_Slot], logits: torch.Tensor) -> None:
        while slots:
            try:
                steps = sample_rows([s.row for s in slots], logits)
                break
            except RowError as e:
                bad = slots[e.row]
                self._fail(bad.job, f"sampling failed: {e}")
                keep = [i for i, s in enumerate(slots) if s.job is not bad.job]
                slots, logits = [slots[i] for i in keep], logits[keep]
        else:
            return
        now = time.monotonic()
        for s, step in zip(slots, steps, strict=True):
            s.last = step.token
            if s.job.first_token is None:
                s.job.first_token = now
            if s.job.cancelled.is_set() or s.job.failed:
                continue
            s.job.emit(Event("token", s.choice, token=step))
            if step.finished:
                self._finish(s, step.finish_reason)

    def _finish(self, s: _Slot, reason: str | None) -> None:
        s.done = True
        s.row.close()
        if s.job.failed:
            return
        if reason is not None:
            s.job.emit(Event("done", s.choice, finish_reason=reason))
        s.job.remaining -= 1
        if s.job.remaining == 0:
            self._log(s.job, "cancelled" if s.job.cancelled.is_set() else "done")

    def _fail(self, job: Job, message: str) -> None:
        if job.failed or job.remaining == 0:  # already answered in full
            return
        job.failed = True
        for s in self.slots:
            if s.job is job:
                s.done = True
                s.row.close()
        job.emit(Event("error", message=message))
        self._log(job, "error")

    def _fail_all(self, message: str) -> None:
        with self.cond:
            queued = list(self.queue)
            self.queue.clear()
        for job in queued:
            self._fail(job, message)
        for s in list(self.slots):
            self._fail(s.job, message)
        self.group = None
        self.slots = []
        reset = getattr(self.f, "reset", None)
        if callable(reset):
            reset()

    def _log(self, job: Job, outcome: str) -> None:
        elapsed = time.monotonic() - job.created
        ttft = None if job.first_token is None else job.first_token - job.created
        logger.info(
            "request %s %s: prompt %d tokens, completion %d tokens, %.3f s (first token %s)",
            job.id,
            outcome,
            len(job.prompt),
            sum(r.step for r in job.rows),
            elapsed,
            "-" if ttft is None else f"{ttft:.3f} s",
        )


def _takes_row(f: Any) -> bool:
    return _takes(getattr(f, "rewind", None), "row")


def _takes(fn: Any, name: str) -> bool:
    import inspect

    if fn is None:
        return False
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def has_rows_protocol(f: Any) -> bool:
    return callable(f) and hasattr(f, "add_row") and hasattr(f, "remove_row")


def as_rows(forward_func: Any, max_rows: int = 8) -> Any:
    """`forward_func` itself when it speaks the rows protocol, else an adapter that does."""
    if has_rows_protocol(forward_func):
        return forward_func
    if is_incremental(forward_func):
        return OneRowAtATime(forward_func)
    if not callable(forward_func):
        raise TypeError(f"forward_func must be callable, got {type(forward_func).__name__}")
    return StatelessRows(forward_func, max_rows)


class StatelessRows:
    """The rows protocol over a stateless forward_func: each row's whole sequence is re-sent every call
    (one call per row: rows may differ in length). Returns the logits of the new positions."""

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor], max_rows: int) -> None:
        self.f, self.max_rows = f, max_rows
        self.seqs: list[list[int]] = []

    def add_row(self) -> int:
        if len(self.seqs) >= self.max_rows:
            raise RuntimeError(f"all {self.max_rows} rows are in use")
        self.seqs.append([])
        return len(self.seqs) - 1

    def remove_row(self, row: int) -> int | None:
        last = len(self.seqs) - 1
        self.seqs[row] = self.seqs[last]
        self.seqs.pop()
        return last if row != last else None

    def reset(self) -> None:
        self.seqs = []

    def rewind(self, n: int, row: int | None = None) -> None:
        for r in range(len(self.seqs)) if row is None else [row]:
            del self.seqs[r][len(self.seqs[r]) - n :]

    def __call__(
        self, new_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, rows: slice | None = None
    ) -> torch.Tensor:
        r0 = 0 if rows is None else rows.start or 0
        t = new_ids.shape[1]
        outs: list[torch.Tensor | None] = []
        for i in range(new_ids.shape[0]):
            new = new_ids[i].tolist()
            if attention_mask is not None:  # left padding of a joining group: only real tokens go in
                keep = attention_mask[i, -t:].tolist()
                new = [x for x, k in zip(new, keep, strict=True) if k]
            seq = self.seqs[r0 + i]
            seq.extend(new)
            if not new:
                outs.append(None)
                continue
            logits = self.f(torch.tensor([seq]))
            logits = logits[:, None] if logits.dim() == 2 else logits[:, -len(new) :]
            if len(new) < t:  # padded positions of this chunk: their logits are never read
                logits = torch.cat([logits[:, :1].expand(1, t - len(new), -1), logits], 1)
            outs.append(logits)
        like = next(o for o in outs if o is not None)
        return torch.cat([torch.zeros_like(like) if o is None else o for o in outs])


class OneRowAtATime:
    """The rows protocol over an incremental forward_func with only `reset` / `rewind` (a pipeline driver):
    one row (`max_rows = 1`); `add_row` starts a new sequence."""

    max_rows = 1

    def __init__(self, f: Any) -> None:
        self.f = f
        self.in_use = False
        self.max_seq_len = getattr(f, "max_seq_len", None)

    def add_row(self) -> int:
        if self.in_use:
            raise RuntimeError("all 1 rows are in use")
        self.f.reset()
        self.in_use = True
        return 0

    def remove_row(self, row: int) -> int | None:
        self.in_use = False
        return None

    def reset(self) -> None:
        self.in_use = False
        self.f.reset()

    def __call__(
        self, new_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, rows: slice | None = None
    ) -> torch.Tensor:
        return self.f(new_ids)
