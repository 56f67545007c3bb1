"""The continuous-batching engine and the HTTP app on a toy model: jobs that join, leave and get cancelled
match `generate` alone; a stateless forward_func (StatelessRows) and an incremental one without rows
(OneRowAtATime) are served correctly; errors are OpenAI-style; 429 when the queue is full."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import Any

import pytest
import torch
from test_batch_rows import PARAMS, V, toy

from llm_sampler import IncrementalHF, SamplingConfig, generate
from llm_sampler.batch import SamplingRow
from llm_sampler.server.engine import Engine, Event, Job, OneRowAtATime, QueueFull, StatelessRows


def _run(engine: Engine, jobs: list[tuple[list[int], list[dict[str, Any]], int]]) -> list[list[list[int]]]:
    """Submit every job at once; -> each job's tokens per choice."""
    out: list[list[list[int]]] = []
    done = threading.Semaphore(0)
    for k, (prompt, params, n_new) in enumerate(jobs):
        out.append([[] for _ in params])
        left = [len(params)]

        def emit(ev: Event, k: int = k, total: list[int] = left) -> None:
            if ev.kind == "token" and ev.token is not None:
                out[k][ev.choice].append(ev.token.token)
            elif ev.kind == "done":
                total[0] -= 1
                if total[0] == 0:
                    done.release()
            elif ev.kind == "error":
                raise AssertionError(ev.message)

        rows = [SamplingRow(SamplingConfig.from_kwargs(p), prompt, n_new) for p in params]
        engine.submit(Job(f"j{k}", prompt, rows, emit))
    for _ in jobs:
        assert done.acquire(timeout=120)
    return out


def _alone(f: Any, prompt: list[int], params: dict[str, Any], n_new: int) -> list[int]:
    new = generate(f, prompt, n_new, **params).new_tokens[0].tolist()
    eos = params.get("eos_token_id")
    return new[: new.index(eos) + 1] if eos is not None and eos in new else new


def test_stateless_rows_match_generate() -> None:
    engine = Engine(toy, max_rows=4, prefill_chunk=3)
    assert isinstance(engine.f, StatelessRows)
    engine.start()
    try:
        jobs = [([(3 * i + j) % V for j in range(2 + i)], [PARAMS[i]], 6 + i) for i in range(len(PARAMS) - 1)]
        got = _run(engine, jobs)
    finally:
        engine.stop()
    for (prompt, params, n_new), tokens in zip(jobs, got, strict=True):
        assert tokens[0] == _alone(toy, prompt, params[0], n_new), params


def test_incremental_without_rows_one_at_a_time(tiny_llama: Any) -> None:
    f = IncrementalHF(tiny_llama)
    engine = Engine(f, max_rows=4)
    assert isinstance(engine.f, OneRowAtATime) and engine.max_rows == 1
    engine.start()
    try:
        jobs = [([5, 6, 7, 8], [{"temperature": 0}], 5), ([9, 10], [{"temperature": 0.8, "seed": 3}], 5)]
        got = _run(engine, jobs)
    finally:
        engine.stop()
    for (prompt, params, n_new), tokens in zip(jobs, got, strict=True):
        assert tokens[0] == _alone(IncrementalHF(tiny_llama), prompt, params[0], n_new)


class KeepingRows(StatelessRows):
    """StatelessRows that takes `logits_to_keep` and records every call's rows and value of it."""

    def __init__(self) -> None:
        super().__init__(toy, 4)
        self.calls: list[tuple[slice | None, int]] = []

    def __call__(  # type: ignore[override]
        self,
        new_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        rows: slice | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        self.calls.append((rows, logits_to_keep))
        out = super().__call__(new_ids, attention_mask, rows)
        return out[:, -logits_to_keep:] if logits_to_keep else out


def test_engine_asks_for_the_last_logits_unless_prompt_logprobs_are_wanted() -> None:
    f = KeepingRows()
    engine = Engine(f, max_rows=4, prefill_chunk=2)
    assert engine.f is f and engine.keeps_logits
    engine.start()
    prompts: list[Event] = []
    try:
        got = _run(engine, [([4, 5, 6, 7, 8], [{"temperature": 0}], 4)])
        done = threading.Event()

        def emit(ev: Event) -> None:
            if ev.kind == "prompt":
                prompts.append(ev)
            if ev.kind in ("done", "error"):
                done.set()

        row = SamplingRow(SamplingConfig.from_kwargs({"temperature": 0}), [4, 5, 6, 7, 8], 1)
        engine.submit(Job("echo", [4, 5, 6, 7, 8], [row], emit, prompt_logprobs=0))
        assert done.wait(60)
    finally:
        engine.stop()
    assert got[0][0] == _alone(toy, [4, 5, 6, 7, 8], {"temperature": 0}, 4)
    keeps = [k for _, k in f.calls]
    # job 1: 3 prefill chunks and 3 decode steps, last position only; job 2: 3 prefill chunks, all positions
    assert keeps == [1] * 6 + [0] * 3, keeps
    lp = [t.logprob for ev in prompts for t in ev.prompt or []]
    assert len(lp) == 5 and lp[0] is None and all(x is not None for x in lp[1:])


def test_idle_engine_gathers_a_wave_into_one_prefill_group() -> None:
    f = KeepingRows()
    engine = Engine(f, max_rows=4, admit_wait=0.5)
    engine.start()
    try:
        out: list[list[list[int]]] = []
        timer = threading.Timer(0.05, lambda: out.extend(_run(engine, [([9, 3], [{"temperature": 0}], 3)])))
        timer.start()
        first = _run(engine, [([4, 5, 6], [{"temperature": 0}], 3)])
        timer.join()
    finally:
        engine.stop()
    assert f.calls[0][0] == slice(0, 2)  # both rows prefilled together
    assert first[0][0] == _alone(toy, [4, 5, 6], {"temperature": 0}, 3)
    assert out[0][0] == _alone(toy, [9, 3], {"temperature": 0}, 3)


def test_a_lone_clients_requests_skip_admit_wait() -> None:
    engine = Engine(toy, max_rows=4, admit_wait=0.01)
    gathers = [0]
    gather = engine._gather_arrivals

    def counted() -> None:
        gathers[0] += 1
        gather()

    engine._gather_arrivals = counted  # type: ignore[method-assign]
    engine.start()
    try:
        for prompt in ([4, 5, 6], [9, 3], [1, 2]):  # back to back: none overlaps another
            assert _run(engine, [(prompt, [{"temperature": 0}], 3)])[0][0] == _alone(
                toy, prompt, {"temperature": 0}, 3
            )
        assert gathers[0] == 1  # the first (nothing was known yet), then each admitted at once
        engine.stop()
        two = threading.Thread(
            target=_run, args=(engine, [([4, 5], [{"temperature": 0}], 3), ([6, 7], [{"temperature": 0}], 3)])
        )
        two.start()
        while engine.queued < 2:  # both wait before the engine starts: they overlap
            time.sleep(0.001)
        engine.start()
        two.join()
        _run(engine, [([8], [{"temperature": 0}], 3)])
        assert gathers[0] == 2  # after requests overlapped, an idle engine gathers again
    finally:
        engine.stop()


def test_run_holds_the_loop_on_the_calling_thread() -> None:
    engine = Engine(toy, max_rows=2)
    seen: list[str] = []

    def ready() -> None:
        def client() -> None:
            _run(engine, [([4, 5, 6], [{"temperature": 0}], 3)])
            seen.append(threading.current_thread().name)
            engine.stop()

        threading.Thread(target=client, name="client").start()

    engine.run(ready=ready)  # returns once the client stops it
    assert seen == ["client"]
    engine.start()  # a stopped engine starts again, on its own thread
    try:
        assert _run(engine, [([9, 3], [{"temperature": 0}], 2)])[0][0] == _alone(
            toy, [9, 3], {"temperature": 0}, 2
        )
    finally:
        engine.stop()


def test_queue_full_and_cancel() -> None:
    engine = Engine(toy, max_rows=2, max_queue=1)
    row = SamplingRow(SamplingConfig(temperature=0), [1, 2], 4)
    engine.submit(Job("a", [1, 2], [row], lambda ev: None))
    with pytest.raises(QueueFull):
        engine.submit(Job("b", [1, 2], [SamplingRow(SamplingConfig(), [1], 4)], lambda ev: None))
    with pytest.raises(ValueError, match="rows"):
        engine.submit(
            Job("c", [1], [SamplingRow(SamplingConfig(), [1], 4) for _ in range(3)], lambda ev: None)
        )
    engine.queue.clear()
    seen: queue.Queue[Event] = queue.Queue()
    cancelled = Job("x", [1, 2, 3], [SamplingRow(SamplingConfig(temperature=0), [1, 2, 3], 1000)], seen.put)
    engine.start()
    try:
        engine.submit(cancelled)
        assert seen.get(timeout=30).kind == "token"
        cancelled.cancel()
        got = _run(engine, [([4, 5], [{"temperature": 0}], 5)])  # the next job is unaffected
        assert got[0][0] == _alone(toy, [4, 5], {"temperature": 0}, 5)
        assert engine.busy_rows <= 1
    finally:
        engine.stop()


class FakeTokenizer:
    eos_token_id = 0
    bos_token_id = 1
    chat_template = "x"

    def __len__(self) -> int:
        return V

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        return [ord(c) % (V - 2) + 2 for c in text]

    def decode(self, ids: list[int], **kw: Any) -> str:
        return "".join(chr(97 + i % 26) for i in ids)

    def apply_chat_template(self, messages: list[dict[str, str]], **kw: Any) -> str:
        return "".join(m["content"] for m in messages)


def test_http_errors_and_results_over_asgi() -> None:
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("starlette")
    from llm_sampler.server import create_app

    app = create_app(toy, FakeTokenizer(), api_key="k", max_rows=2, max_queue=0)
    engine = app.state.engine
    engine.max_queue = 8

    async def go() -> None:
        transport = httpx.ASGITransport(app=app)
        h = {"Authorization": "Bearer k"}
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert (await c.get("/v1/models")).status_code == 401
            assert (await c.get("/v1/models", headers={"Authorization": "Bearer no"})).status_code == 401
            r = await c.post("/v1/completions", json={"prompt": [3, 4], "top_k": "x"}, headers=h)
            assert r.status_code == 400 and r.json()["error"]["param"] == "top_k"
            r = await c.post("/v1/completions", json={"prompt": [3, 4], "n": 3}, headers=h)
            assert r.status_code == 400 and r.json()["error"]["param"] == "n"
            r = await c.post("/v1/completions", json={"prompt": [3, V + 5]}, headers=h)
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
            r = await c.post("/v1/nothing", json={}, headers=h)
            assert r.status_code == 404 and "error" in r.json()
            engine.max_queue = 0
            r = await c.post("/v1/completions", json={"prompt": [3, 4]}, headers=h)
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
            engine.max_queue = 8
            body = {
                "prompt": [3, 4, 5],
                "max_tokens": 5,
                "temperature": 0,
                "logprobs": 2,
                "echo": True,
                "ignore_eos": True,
            }
            r = await c.post("/v1/completions", json=body, headers=h)
            assert r.status_code == 200, r.text
            lp = r.json()["choices"][0]["logprobs"]
            assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == 3 + 5
            ref = toy(torch.tensor([[3, 4, 5]])).log_softmax(-1)
            assert lp["token_logprobs"][1] == pytest.approx(float(ref[0, 0, 4]), abs=1e-5)
            assert r.json()["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}

    engine.start()
    try:
        asyncio.run(go())
    finally:
        engine.stop()
