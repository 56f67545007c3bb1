"""`python -m llm_model_parts.serve --http`: one process, and a 3-process pipeline whose rank 0 serves,
answer the official openai client with the greedy tokens of llm_sampler.generate over one process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
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
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        text = (
            client.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
        )
        chat = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=8, temperature=0)
        return text, chat.choices[0].message.content or ""
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


def test_three_process_pipeline_http_equals_one(smollm2: Path, expected: tuple[str, str]) -> None:
    port = support.free_port()
    argv = _argv(smollm2, port, "--plan", "b 0-10,10-20,20-30 e", "--timeout", "120")
    procs, logs = _serve([argv] * 3)
    assert _ask(port, procs, logs) == expected


def test_help_documents_every_flag() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "llm_model_parts.serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--http", "--api-key", "--offload", "--max-rows", "--max-queue", "--max-tokens-limit"):
        assert flag in out
    assert torch is not None
