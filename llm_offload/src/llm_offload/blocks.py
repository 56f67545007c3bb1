"""The block schedule: many micro-batches through the model's unchanged forward, layer by layer.

Each micro-batch's forward runs on its own thread, but only one runs at a time: a turn passes round-robin
at every offloaded module's pre-hook. So after the first round every micro-batch runs layer i (loaded once)
before any runs layer i+1. Running one at a time keeps each forward's own state (its KV cache, torch's
thread-local modes, copied from the caller) exactly as in a plain call; the results equal running the
micro-batches one after another.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch


class _Aborted(Exception):
    """Raised in the other micro-batches' forwards when one of them failed."""


class BlockRunner:
    def __init__(self, n: int) -> None:
        self.n = n
        self._cond = threading.Condition()
        self._turn = 0
        self._live = [True] * n
        self._abort = False
        self._local = threading.local()
        self.failed = False

    def run(self, items: Sequence[Any], fn: Callable[[Any], Any]) -> list[Any]:
        results: list[Any] = [None] * self.n
        errors: list[BaseException | None] = [None] * self.n
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        stream = (
            torch.cuda.current_stream() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        )

        def work(j: int) -> None:
            self._local.index = j
            try:
                self._wait_turn(j)
                with torch.inference_mode(inference), torch.set_grad_enabled(grad), _maybe_stream(stream):
                    results[j] = fn(items[j])
            except BaseException as e:
                errors[j] = e
                if not isinstance(e, _Aborted):
                    with self._cond:
                        self._abort = True
            finally:
                with self._cond:
                    self._live[j] = False
                    self._pass_turn(j)

        threads = [
            threading.Thread(target=work, args=(j,), name=f"llm_offload-block-{j}", daemon=True)
            for j in range(self.n)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        real = [e for e in errors if e is not None and not isinstance(e, _Aborted)]
        if real:
            self.failed = True
            raise real[0]
        if any(errors):
            self.failed = True
            raise RuntimeError("run_blocks: micro-batches were aborted") from next(e for e in errors if e)
        return results

    def turn(self) -> None:
        """At a pre-hook: let the next micro-batch run up to this point, then continue."""
        j = getattr(self._local, "index", None)
        if j is None:
            return  # a module called from a thread that is not one of ours: no scheduling
        with self._cond:
            self._pass_turn(j)
            self._wait_turn(j)

    def _pass_turn(self, j: int) -> None:
        # Lock held. The next live micro-batch after j (j itself when it is the only one left).
        for step in range(1, self.n + 1):
            k = (j + step) % self.n
            if self._live[k]:
                self._turn = k
                break
        self._cond.notify_all()

    def _wait_turn(self, j: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._turn == j or self._abort)
            if self._abort:
                raise _Aborted()


class _maybe_stream:
    def __init__(self, stream: Any) -> None:
        self.ctx = torch.cuda.stream(stream) if stream is not None else None

    def __enter__(self) -> None:
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(*exc)
