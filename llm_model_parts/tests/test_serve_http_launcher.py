"""`python -m llm_model_parts.serve --http`: one process, and a 3-process pipeline whose rank 0 serves,
answer the official openai client with the greedy tokens of llm_sampler.generate over one process; the
pipeline serves concurrent requests (continuous batching through the driver's rows) and the prompt's
log-probabilities (echo) as the one process does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import pipeline_support as support

openai = pytest.importorskip("openai", reason="openai is in tools/requirements-test.txt")
pytest.importorskip("uvicorn", reason="llm-sampler[server]")
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]
CONCURRENT = ["Once upon a time", "def fibonacci(n):", "The three primary colours are", "1, 2, 3, 4,"]
ECHO = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def smollm2() -> Path:
    import fixtures

    return Path(fixtures.real_checkpoint("smollm2"))


@pytest.fixture(scope="module")
def expected(smollm2: Path) -> tuple[str, str]:
    from transformers import AutoTokenizer

    import llm_sampler
    from llm_model_parts import load_part

    tok = AutoTokenizer.from_pretrained(smollm2)
    f = load_part(smollm2, "f").as_forward_func(max_seq_len=128)

    def greedy(ids: list[int]) -> str:
        new = (
            llm_sampler.generate(f, ids, 8, temperature=0, eos_token_id=tok.eos_token_id)
            .new_tokens[0]
            .tolist()
        )
        return str(tok.decode(new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new))

    chat = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    return greedy(tok.encode(PROMPT)), greedy(tok.encode(chat, add_special_tokens=False))


@pytest.fixture(scope="module")
def expected_concurrent(smollm2: Path) -> list[str]:
    from transformers import AutoTokenizer

    import llm_sampler
    from llm_model_parts import load_part

    tok = AutoTokenizer.from_pretrained(smollm2)
    f = load_part(smollm2, "f").as_forward_func(max_seq_len=128)
    out = []
    for prompt in CONCURRENT:
        new = llm_sampler.generate(f, tok.encode(prompt), 8, temperature=0).new_tokens[0].tolist()
        out.append(str(tok.decode(new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new)))
    return out


def _serve(argvs: list[list[str]]) -> tuple[list[subprocess.Popen[bytes]], list[Any]]:
    world, master = len(argvs), support.free_port()
    procs, logs = [], []
    for rank, argv in enumerate(argvs):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if world > 1:
            env.update(
                RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(master), GLOO_SOCKET_IFNAME="lo",
            )  # fmt: skip
        log = tempfile.TemporaryFile("w+")  # noqa: SIM115
        logs.append(log)
        procs.append(
            subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )
    return procs, logs


def _ask(port: int, procs: list[subprocess.Popen[bytes]], logs: list[Any]) -> tuple[str, str]:
    with _running(port, procs, logs) as client:
        return _standard(client)


def _standard(client: Any) -> tuple[str, str]:
    text = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    chat = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=8, temperature=0)
    return text, chat.choices[0].message.content or ""


def _concurrent(client: Any) -> list[str]:
    def one(prompt: str) -> str:
        return str(
            client.completions.create(model="m", prompt=prompt, max_tokens=8, temperature=0).choices[0].text
        )

    with ThreadPoolExecutor(len(CONCURRENT)) as pool:
        return list(pool.map(one, CONCURRENT))


def _echo(port: int) -> dict[str, Any]:
    import httpx

    body = {"model": "m", "prompt": ECHO, "echo": True, "logprobs": 1, "max_tokens": 0}
    r = httpx.post(
        f"http://127.0.0.1:{port}/v1/completions",
        json=body,
        headers={"Authorization": "Bearer k"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    logprobs: dict[str, Any] = r.json()["choices"][0]["logprobs"]
    return logprobs


@contextmanager
def _running(port: int, procs: list[subprocess.Popen[bytes]], logs: list[Any]) -> Iterator[Any]:
    """An openai client of the server `procs` start, once it answers /health; the processes end after."""
    import httpx

    deadline = time.monotonic() + 300
    try:
        while True:
            if any(p.poll() is not None for p in procs):
                logs[0].seek(0)
                raise AssertionError("a rank exited:\n" + logs[0].read()[-4000:])
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _argv(model: Path, port: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "llm_model_parts.serve", "--model", str(model), "--http", f"127.0.0.1:{port}",
        "--max-seq-len", "128", "--api-key", "k", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("extra", [[], ["--offload", "40MiB"]], ids=["resident", "offloaded"])
def test_one_process_http(smollm2: Path, expected: tuple[str, str], extra: list[str]) -> None:
    port = support.free_port()
    procs, logs = _serve([_argv(smollm2, port, *extra)])
    assert _ask(port, procs, logs) == expected


def test_three_process_pipeline_http_equals_one(
    smollm2: Path, expected: tuple[str, str], expected_concurrent: list[str]
) -> None:
    one_port, port = support.free_port(), support.free_port()
    argv = _argv(smollm2, port, "--plan", "b 0-10,10-20,20-30 e", "--timeout", "120", "--micro-batches", "2")
    one_procs, one_logs = _serve([_argv(smollm2, one_port)])
    procs, logs = _serve([argv] * 3)
    with _running(one_port, one_procs, one_logs), _running(port, procs, logs) as client:
        assert _standard(client) == expected
        assert _concurrent(client) == expected_concurrent  # 4 at once: rows of one batch
        want, got = _echo(one_port), _echo(port)  # every position's logits through output="last"
        assert got["tokens"] == want["tokens"] and got["token_logprobs"][0] is None
        torch.testing.assert_close(
            torch.tensor(got["token_logprobs"][1:]),
            torch.tensor(want["token_logprobs"][1:]),
            rtol=0,
            atol=1e-4,
        )
        tops = [(t, w) for t, w in zip(got["top_logprobs"][1:], want["top_logprobs"][1:], strict=True)]
        assert all(t.keys() == w.keys() for t, w in tops)
        assert [v for t, _ in tops for v in t.values()] == pytest.approx(
            [v for _, w in tops for v in w.values()], abs=1e-4
        )


def test_help_documents_every_flag() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "llm_model_parts.serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--http", "--api-key", "--offload", "--max-rows", "--max-queue", "--max-tokens-limit"):
        assert flag in out
    assert torch is not None
