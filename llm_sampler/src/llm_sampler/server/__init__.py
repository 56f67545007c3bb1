"""An OpenAI-compatible HTTP server over any forward_func and Hugging Face tokenizer, with continuous
batching (the optional extra `llm-sampler[server]`: Starlette + uvicorn, imported lazily).

    from llm_sampler.server import create_app, serve
    serve(forward_func, tokenizer, host="127.0.0.1", port=8000)   # blocks; or
    app = create_app(forward_func, tokenizer)                      # any ASGI server

See docs/server.md for the routes, the request fields, the limits and the errors.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from llm_sampler.server.engine import Engine, Event, Job, QueueFull, as_rows
from llm_sampler.server.protocol import Limits

API_KEY_ENV = "LLM_SAMPLER_API_KEY"

__all__ = ["API_KEY_ENV", "Engine", "Event", "Job", "Limits", "QueueFull", "as_rows", "create_app", "serve"]


def _require_extra() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "the HTTP server needs Starlette and uvicorn: pip install 'llm-sampler[server]'"
        ) from e


def create_app(
    forward_func: Any,
    tokenizer: Any,
    *,
    model_name: str = "model",
    api_key: str | None = None,
    max_rows: int = 8,
    max_queue: int = 64,
    prefill_chunk: int = 128,
    admit_wait: float = 0.01,
    max_seq_len: int | None = None,
    max_body_bytes: int = 1 << 20,
    limits: Limits | None = None,
) -> Any:
    """The ASGI app. `api_key` (default: the env var LLM_SAMPLER_API_KEY; None or "" = open) is checked on
    every /v1 route (`Authorization: Bearer KEY`, else 401). The engine thread starts with the app's
    lifespan. `app.state.engine` is the `Engine`. `admit_wait`: an idle engine admits once that many seconds
    pass with no new request, so that a wave of clients prefills as one group (only after requests
    overlapped: one client's requests, back to back, are admitted at once)."""
    _require_extra()
    from llm_sampler.server.app import Server, ServerConfig, build_app

    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    engine = Engine(
        forward_func,
        max_rows=max_rows,
        max_queue=max_queue,
        prefill_chunk=prefill_chunk,
        max_seq_len=max_seq_len,
        admit_wait=admit_wait,
    )
    config = ServerConfig(model_name, api_key, max_body_bytes, limits or Limits())
    app = build_app(Server(engine, tokenizer, config))
    app.state.engine = engine
    return app


def serve(
    forward_func: Any,
    tokenizer: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    **kwargs: Any,
) -> None:
    """Run the server with uvicorn until interrupted (binds 127.0.0.1 unless told otherwise).

    The model runs on the calling thread, uvicorn's event loop on a helper thread. On the CPU this is ~30%
    of a decode step: the calling thread (which built the model) holds torch's OpenMP pool already, and a
    second thread's pool makes libgomp count more threads than CPUs and stop spinning between parallel
    regions. SIGINT and SIGTERM end it gracefully (requests in flight get an error), then are re-raised."""
    _require_extra()
    import uvicorn

    app = create_app(forward_func, tokenizer, **kwargs)
    engine: Engine = app.state.engine
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)

    def run_http() -> None:
        try:
            server.run()
        finally:  # a failed bind or a shutdown: the model loop ends too
            engine.stop()

    caught: list[int] = []

    def on_signal(signum: int) -> None:
        caught.append(signum)
        engine.stop()

    http = threading.Thread(target=run_http, name="llm_sampler-http", daemon=True)
    restore = _on_signals(on_signal)
    try:
        engine.run(ready=http.start)
    finally:
        server.should_exit = True
        if http.is_alive():
            http.join(timeout=30)
        for signum, handler in restore.items():
            signal.signal(signum, handler)
    for signum in caught[:1]:
        signal.raise_signal(signum)  # as uvicorn does: the caller sees the interrupt


def _on_signals(handler: Callable[[int], Any]) -> dict[int, Any]:
    """SIGINT and SIGTERM call `handler(signum)` (on the main thread only); -> the handlers they had."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    old: dict[int, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        old[signum] = signal.signal(signum, lambda signum, frame: handler(signum))
    return old
