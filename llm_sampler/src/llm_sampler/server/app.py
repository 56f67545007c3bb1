"""The ASGI application (Starlette): OpenAI-compatible routes over one `Engine` and one tokenizer.

Routes: POST /v1/chat/completions, POST /v1/completions, POST /v1/score, GET /v1/models, GET /health.
See docs/server.md for the request shapes, the limits and the errors.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llm_sampler.batch import RowToken, SamplingRow
from llm_sampler.closed_form import TextEncoder
from llm_sampler.scores import OptionScore, Scores, check_normalize
from llm_sampler.server import protocol as P
from llm_sampler.server.engine import Engine, Event, Job, PromptToken, QueueFull

logger = logging.getLogger("llm_sampler.server")
_ids = itertools.count()


@dataclass
class ServerConfig:
    model_name: str = "model"
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    limits: P.Limits = field(default_factory=P.Limits)


def error(status: int, message: str, param: str | None = None, kind: str | None = None) -> JSONResponse:
    kind = kind or {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


class _Stream:
    """A job's events, moved from the engine thread to the request's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def emit(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class Server:
    def __init__(self, engine: Engine, tokenizer: Any, config: ServerConfig) -> None:
        self.engine, self.tokenizer, self.config = engine, tokenizer, config
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}

    # ---- plumbing --------------------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        key = self.config.api_key
        if not key:
            return True
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        return hmac.compare_digest(token.encode(), key.encode())

    async def _body(self, request: Request) -> Any:
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise P.BadRequest(f"the request body exceeds {limit} bytes", None, 413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise P.BadRequest(f"the request body exceeds {limit} bytes", None, 413)
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise P.BadRequest(f"the request body is not valid JSON: {e}", None) from e

    def token_text(self, token: int) -> str:
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self.tokenizer.decode([token])
        return text

    def _rows(self, parsed: P.Parsed, prompt: list[int], max_tokens: int) -> list[SamplingRow]:
        limit = self.engine.max_seq_len
        if limit is not None and len(prompt) + max_tokens > limit:
            raise P.BadRequest(
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                f"context of {limit} tokens",
                "max_tokens" if len(prompt) < limit else "prompt",
            )
        rows = []
        for j in range(parsed.n):
            config = P.choice_config(parsed, j)
            try:
                rows.append(SamplingRow(config, prompt, max_tokens, top_logprobs=parsed.top_logprobs))
            except ValueError as e:
                for r in rows:
                    r.close()
                raise P.BadRequest(
                    str(e), "response_format" if config.json_schema is not None else None
                ) from e
        return rows

    def _submit(
        self, request_id: str, prompt: list[int], rows: list[SamplingRow], echo: int | None
    ) -> _Stream:
        stream = _Stream(asyncio.get_running_loop())
        job = Job(request_id, prompt, rows, stream.emit, prompt_logprobs=echo)
        stream.job = job  # type: ignore[attr-defined]
        try:
            self.engine.submit(job)
        except QueueFull as e:
            for r in rows:
                r.close()
            raise P.BadRequest(str(e), None, 429) from e
        except ValueError as e:
            for r in rows:
                r.close()
            raise P.BadRequest(str(e), "n") from e
        return stream

    # ---- routes ----------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse(
            {
                "status": "ok",
                "rows": self.engine.busy_rows,
                "queued": self.engine.queued,
                "max_rows": self.engine.max_rows,
            }
        )

    async def models(self, request: Request) -> Response:
        if not self._authorized(request):
            return error(401, "invalid or missing API key (Authorization: Bearer ...)")
        model = {
            "id": self.config.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "llm_microlibs",
        }
        return JSONResponse({"object": "list", "data": [model]})

    async def completions(self, request: Request) -> Response:
        return await self._handle(request, chat=False)

    async def chat(self, request: Request) -> Response:
        return await self._handle(request, chat=True)

    async def score(self, request: Request) -> Response:
        if not self._authorized(request):
            return error(401, "invalid or missing API key (Authorization: Bearer ...)")
        try:
            body = P.check_fields(
                await self._body(request), {"model", "context", "options", "requests", "normalize"}
            )
            return await self._score(request, body)
        except P.BadRequest as e:
            return error(e.status, e.message, e.param)
        except ClientDisconnect:
            return error(400, "the client disconnected")

    async def _handle(self, request: Request, *, chat: bool) -> Response:
        if not self._authorized(request):
            return error(401, "invalid or missing API key (Authorization: Bearer ...)")
        try:
            body = P.check_fields(await self._body(request), P.CHAT_FIELDS if chat else P.COMPLETION_FIELDS)
            parsed = P.parse_common(body, self.tokenizer, self.config.limits, chat=chat)
            if chat:
                prompts = [P.chat_prompt(body, self.tokenizer)]
                echo = False
            else:
                prompts = P.completion_prompts(body, self.tokenizer)
                echo = body.get("echo", False)
                if not isinstance(echo, bool):
                    raise P.BadRequest("echo must be a boolean", "echo")
                if body.get("suffix") is not None:
                    raise P.BadRequest("suffix is not supported", "suffix")
                if len(prompts) * parsed.n > self.config.limits.max_n * 8:
                    raise P.BadRequest("too many prompts in one request", "prompt")
                if parsed.stream and echo and parsed.top_logprobs is not None:
                    raise P.BadRequest("echo with logprobs is not supported when streaming", "echo")
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
            want_prompt = None if not echo or parsed.top_logprobs is None else parsed.top_logprobs
            streams = []
            try:
                for i, prompt in enumerate(prompts):
                    rows = self._rows(parsed, prompt, parsed.max_tokens)
                    streams.append(
                        self._submit(f"{rid}.{i}" if len(prompts) > 1 else rid, prompt, rows, want_prompt)
                    )
            except P.BadRequest:
                for s in streams:
                    s.job.cancel()  # type: ignore[attr-defined]
                raise
        except P.BadRequest as e:
            return error(e.status, e.message, e.param)
        except ClientDisconnect:
            return error(400, "the client disconnected")
        run = _Run(self, rid, chat, parsed, prompts, streams, echo)
        if parsed.stream:
            return StreamingResponse(run.sse(request), media_type="text/event-stream")
        return await run.whole(request)

    async def _score(self, request: Request, body: dict[str, Any]) -> Response:
        normalize = body.get("normalize", "none")
        try:
            check_normalize(normalize)
        except ValueError as e:
            raise P.BadRequest(str(e), "normalize") from e
        if normalize == "unconditional":
            raise P.BadRequest(
                "normalize='unconditional' is not served; use none, token, char or byte", "normalize"
            )
        reqs = body.get("requests")
        if reqs is None:
            reqs = [{"context": body.get("context"), "options": body.get("options")}]
        if not isinstance(reqs, list) or not reqs or len(reqs) > 256:
            raise P.BadRequest("requests must be a list of 1..256 {context, options}", "requests")
        encoder = TextEncoder(self.tokenizer)
        pairs: list[tuple[int, str, list[int], list[int]]] = []
        for q, r in enumerate(reqs):
            ctx, opts = (r.get("context"), r.get("options")) if isinstance(r, dict) else (None, None)
            if not isinstance(ctx, str) or not isinstance(opts, list) or not opts or len(opts) > 64:
                raise P.BadRequest(
                    f"requests[{q}] must be {{context: str, options: [1..64 strings]}}", "requests"
                )
            for o in opts:
                if not isinstance(o, str) or not o:
                    raise P.BadRequest(f"requests[{q}].options must be non-empty strings", "options")
                pair = encoder.pair(ctx, o)
                pairs.append((q, o, list(pair[0]), list(pair[1])))
        rid = "score-" + uuid.uuid4().hex[:24]
        from llm_sampler.config import SamplingConfig

        streams = []
        try:
            for i, (_, _, ctx_ids, opt_ids) in enumerate(pairs):
                prompt = ctx_ids + opt_ids
                if self.engine.max_seq_len is not None and len(prompt) > self.engine.max_seq_len:
                    raise P.BadRequest(
                        f"a context + option holds {len(prompt)} tokens, over the model's context", "options"
                    )
                rows = [SamplingRow(SamplingConfig(temperature=0), prompt, 0)]
                streams.append(self._submit(f"{rid}.{i}", prompt, rows, 0))
        except P.BadRequest:
            for s in streams:
                s.job.cancel()  # type: ignore[attr-defined]
            raise
        results: list[list[OptionScore]] = [[] for _ in reqs]
        try:
            for (q, o, ctx_ids, opt_ids), s in zip(pairs, streams, strict=True):
                got = await _collect_prompt(s, request)
                scored = got[len(ctx_ids) :]
                results[q].append(
                    OptionScore([p.logprob or 0.0 for p in scored], all(p.greedy for p in scored), opt_ids, o)
                )
        except _Failed as e:
            for s in streams:
                s.job.cancel()  # type: ignore[attr-defined]
            return error(e.status, e.message)
        out = []
        for opts in results:
            sc = Scores(opts, normalize)
            out.append(
                {
                    "options": [
                        {
                            "text": o.text,
                            "loglikelihood": o.loglikelihood,
                            "normalized": o.normalized(normalize),
                            "is_greedy": o.is_greedy,
                            "num_tokens": o.num_tokens,
                            "token_logprobs": o.token_logprobs,
                        }
                        for o in opts
                    ],
                    "best": sc.best(),
                }
            )
        return JSONResponse({"id": rid, "object": "score", "model": self.config.model_name, "results": out})


class _Failed(Exception):
    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.message, self.status = message, status


async def _next(stream: _Stream, request: Request) -> Event:
    """The job's next event; cancels the job when the client goes away."""
    if not stream.queue.empty():  # no task nor timer when the engine is ahead
        return stream.queue.get_nowait()
    while True:
        try:
            return await asyncio.wait_for(stream.queue.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                stream.job.cancel()  # type: ignore[attr-defined]
                raise _Failed("the client disconnected", 499) from None


async def _collect_prompt(stream: _Stream, request: Request) -> list[PromptToken]:
    tokens: list[PromptToken] = []
    while True:
        ev = await _next(stream, request)
        if ev.kind == "prompt" and ev.prompt:
            tokens.extend(ev.prompt)
        elif ev.kind == "error":
            raise _Failed(ev.message or "the request failed")
        elif ev.kind == "done":
            return tokens


class _Run:
    """One request's jobs (one per prompt, each with n choices) turned into an OpenAI response."""

    def __init__(
        self,
        server: Server,
        rid: str,
        chat: bool,
        parsed: P.Parsed,
        prompts: list[list[int]],
        streams: list[_Stream],
        echo: bool,
    ) -> None:
        self.s, self.rid, self.chat, self.p = server, rid, chat, parsed
        self.prompts, self.streams, self.echo = prompts, streams, echo
        self.created = int(time.time())
        n = parsed.n
        self.trackers = [
            P.TextTracker(server.tokenizer.decode, parsed.stop, parsed.params.get("eos_token_id"))
            for _ in range(len(prompts) * n)
        ]
        self.tokens: list[list[RowToken]] = [[] for _ in self.trackers]
        self.finish: list[str | None] = [None] * len(self.trackers)
        self.prompt_lp: list[list[PromptToken]] = [[] for _ in prompts]

    def _cancel(self) -> None:
        for s in self.streams:
            s.job.cancel()  # type: ignore[attr-defined]

    def _usage(self) -> dict[str, int]:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(t) for t in self.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def _events(self, request: Request) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) until every choice of every prompt is done."""
        n = self.p.n
        pending = {i: n for i in range(len(self.streams))}
        if len(pending) == 1:  # one job (the usual request): awaited directly, no task per event
            while pending:
                ev = await _next(self.streams[0], request)
                yield self._count(pending, 0, ev), ev
            return
        tasks: dict[asyncio.Task[Event], int] = {}
        try:
            while pending:
                for i in pending:
                    if i not in tasks.values():
                        tasks[asyncio.ensure_future(_next(self.streams[i], request))] = i
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    i = tasks.pop(t)
                    ev = t.result()
                    yield self._count(pending, i, ev), ev
        finally:
            for t in tasks:
                t.cancel()

    def _count(self, pending: dict[int, int], i: int, ev: Event) -> int:
        """Job i's event: raises on an error, counts its done choices; -> the choice's index."""
        if ev.kind == "error":
            raise _Failed(ev.message or "the request failed")
        if ev.kind == "done":
            pending[i] -= 1
            if pending[i] == 0:
                del pending[i]
        return i * self.p.n + ev.choice

    def _apply(self, index: int, ev: Event) -> str | None:
        """Record an event; -> the new text of a token event."""
        if ev.kind == "prompt" and ev.prompt:
            self.prompt_lp[index // self.p.n].extend(ev.prompt)
        elif ev.kind == "token" and ev.token is not None:
            tracker = self.trackers[index]
            if tracker.stopped:
                return None
            self.tokens[index].append(ev.token)
            return tracker.push(ev.token.token)
        elif ev.kind == "done":
            self.finish[index] = ev.finish_reason
            return self.trackers[index].finish()
        return None

    async def whole(self, request: Request) -> Response:
        try:
            async for index, ev in self._events(request):
                self._apply(index, ev)
        except _Failed as e:
            self._cancel()
            return error(e.status, e.message)
        choices = []
        for i, tracker in enumerate(self.trackers):
            text = tracker.sent
            reason = self.finish[i] or "stop"
            if self.chat:
                choice: dict[str, Any] = {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": reason,
                    "logprobs": self._chat_logprobs(self.tokens[i])
                    if self.p.top_logprobs is not None
                    else None,
                }
            else:
                prompt_i = i // self.p.n
                if self.echo:
                    text = self.s.tokenizer.decode(self.prompts[prompt_i]) + text
                choice = {
                    "index": i,
                    "text": text,
                    "finish_reason": reason,
                    "logprobs": self._completion_logprobs(i) if self.p.top_logprobs is not None else None,
                }
            choices.append(choice)
        body = {
            "id": self.rid,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.s.config.model_name,
            "choices": choices,
            "usage": self._usage(),
        }
        return JSONResponse(body)

    def _chat_logprobs(self, tokens: Sequence[RowToken]) -> dict[str, Any]:
        def entry(tok: int, lp: float) -> dict[str, Any]:
            text = self.s.token_text(tok)
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        content = []
        for t in tokens:
            e = entry(t.token, t.logprob if t.logprob is not None else 0.0)
            e["top_logprobs"] = [entry(a, b) for a, b in t.top or []]
            content.append(e)
        return {"content": content}

    def _completion_logprobs(self, index: int) -> dict[str, Any]:
        tokens: list[str] = []
        lps: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        want_top = bool(self.p.top_logprobs)
        if self.echo:
            for pt in self.prompt_lp[index // self.p.n]:
                tokens.append(self.s.token_text(pt.token))
                lps.append(pt.logprob)
                tops.append(
                    None if pt.logprob is None else {self.s.token_text(a): b for a, b in pt.top or []}
                )
        for t in self.tokens[index]:
            tokens.append(self.s.token_text(t.token))
            lps.append(t.logprob)
            tops.append({self.s.token_text(a): b for a, b in t.top or []})
        offsets, pos = [], 0
        for text in tokens:
            offsets.append(pos)
            pos += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": lps,
            "top_logprobs": tops if want_top else None,
            "text_offset": offsets,
        }

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        body: dict[str, Any] = {
            "id": self.rid,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.s.config.model_name,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def _delta(self, index: int, text: str, ev: Event, reason: str | None) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"content": text} if text or reason is None else {}
            choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": reason}
            if self.p.top_logprobs is not None and ev.token is not None:
                choice["logprobs"] = self._chat_logprobs([ev.token])
            return choice
        choice = {"index": index, "text": text, "finish_reason": reason, "logprobs": None}
        if self.p.top_logprobs is not None and ev.token is not None:
            t = ev.token
            choice["logprobs"] = {
                "tokens": [self.s.token_text(t.token)],
                "token_logprobs": [t.logprob],
                "top_logprobs": [{self.s.token_text(a): b for a, b in t.top or []}]
                if self.p.top_logprobs
                else None,
                "text_offset": [0],
            }
        return choice

    async def sse(self, request: Request) -> AsyncIterator[str]:
        try:
            if self.chat:
                yield self._chunk(
                    [
                        {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                        for i in range(len(self.trackers))
                    ]
                )
            elif self.echo:
                for i in range(len(self.trackers)):
                    text = self.s.tokenizer.decode(self.prompts[i // self.p.n])
                    yield self._chunk([{"index": i, "text": text, "finish_reason": None, "logprobs": None}])
            async for index, ev in self._events(request):
                text = self._apply(index, ev)
                if ev.kind == "token" and text:
                    yield self._chunk([self._delta(index, text, ev, None)])
                elif ev.kind == "done":
                    yield self._chunk(
                        [self._delta(index, text or "", Event("done"), ev.finish_reason or "stop")]
                    )
            if self.p.include_usage:
                yield self._chunk([], self._usage())
            yield "data: [DONE]\n\n"
        except _Failed as e:
            self._cancel()
            if e.status != 499:
                yield f"data: {json.dumps({'error': {'message': e.message, 'type': 'server_error'}})}\n\n"
        finally:
            self._cancel()  # a client gone mid-stream: its rows leave the batch at the next step


def build_app(server: Server) -> Starlette:
    routes = [
        Route("/health", server.health, methods=["GET"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat, methods=["POST"]),
        Route("/v1/score", server.score, methods=["POST"]),
    ]
    engine = server.engine

    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    from contextlib import asynccontextmanager

    app = Starlette(routes=routes, lifespan=asynccontextmanager(lifespan))

    async def not_found(request: Request, exc: Exception) -> Response:
        return error(404, f"no route {request.url.path}")

    async def not_allowed(request: Request, exc: Exception) -> Response:
        return error(405, f"{request.method} is not allowed on {request.url.path}")

    async def internal(request: Request, exc: Exception) -> Response:
        logger.error("unhandled error on %s", request.url.path, exc_info=exc)
        return error(500, "internal server error")

    app.add_exception_handler(404, not_found)
    app.add_exception_handler(405, not_allowed)
    app.add_exception_handler(500, internal)
    return app
