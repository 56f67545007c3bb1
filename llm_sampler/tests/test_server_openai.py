"""The HTTP server on SmolLM2 (a Part's incremental forward_func, rows protocol) behind real uvicorn on
loopback: the official openai client gets the greedy tokens of llm_sampler.generate; lm-evaluation-harness'
local-completions gets score_many's log-likelihoods; /v1/score is score_many."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from server_testlib import RunningServer
from test_scoring import TEXT_REQUESTS

import llm_model_parts
from llm_sampler import IncrementalHF, generate, score_many

openai = pytest.importorskip("openai", reason="openai is in tools/requirements-test.txt")
pytest.importorskip("uvicorn", reason="llm-sampler[server]")

KEY = "test-key"


@pytest.fixture(scope="module")
def server(smollm2_path: Any, smollm2_tokenizer: Any) -> Iterator[RunningServer]:
    from llm_sampler.server import create_app

    torch.set_num_threads(2)
    forward = llm_model_parts.load_part(smollm2_path, "f").as_forward_func(max_seq_len=1024)
    app = create_app(
        forward, smollm2_tokenizer, model_name="smollm2", api_key=KEY, max_rows=6, prefill_chunk=64
    )
    s = RunningServer(app)
    yield s
    s.close()
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Any:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def _chat_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tok.encode(text, add_special_tokens=False))


def _greedy(model: Any, tok: Any, ids: list[int], n: int) -> str:
    out = generate(IncrementalHF(model), ids, n, temperature=0, eos_token_id=tok.eos_token_id)
    new = out.new_tokens[0].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    return str(tok.decode(new))


MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name three colours."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]


def test_chat_and_completions_match_generate(client: Any, smollm2: Any, smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    expected = [_greedy(smollm2, tok, _chat_ids(tok, m), 24) for m in MESSAGES]

    def chat(i: int) -> tuple[str, str]:
        whole = client.chat.completions.create(
            model="smollm2", messages=MESSAGES[i], max_tokens=24, temperature=0
        )
        parts = client.chat.completions.create(
            model="smollm2", messages=MESSAGES[i], max_tokens=24, temperature=0, stream=True
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
        assert whole.usage.completion_tokens <= 24
        return whole.choices[0].message.content, streamed

    with ThreadPoolExecutor(3) as pool:  # concurrent requests share the batch
        got = list(pool.map(chat, range(len(MESSAGES))))
    for (whole, streamed), exp in zip(got, expected, strict=True):
        assert whole == exp and streamed == exp

    prompt = "The three primary colours are"
    exp = _greedy(smollm2, tok, list(tok.encode(prompt)), 16)
    out = client.completions.create(model="smollm2", prompt=prompt, max_tokens=16, temperature=0)
    assert out.choices[0].text == exp
    assert out.usage.prompt_tokens == len(tok.encode(prompt))
    parts = client.completions.create(
        model="smollm2", prompt=prompt, max_tokens=16, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in parts) == exp


def test_sampling_fields_n_seed_stop_logprobs(client: Any, smollm2: Any, smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    prompt = "Once upon a time"
    ids = list(tok.encode(prompt))
    params = {"temperature": 0.9, "top_k": 40, "top_p": 0.95}
    out = client.completions.create(
        model="smollm2",
        prompt=prompt,
        max_tokens=10,
        n=2,
        seed=7,
        temperature=0.9,
        top_p=0.95,
        extra_body={"top_k": 40},
    )
    ref = generate(
        IncrementalHF(smollm2),
        ids,
        10,
        seed=7,
        num_return_sequences=2,
        eos_token_id=tok.eos_token_id,
        **params,
    )
    for choice, row in zip(out.choices, ref.new_tokens, strict=True):
        assert choice.text == tok.decode(row.tolist())
    llama = client.completions.create(
        model="smollm2",
        prompt=prompt,
        max_tokens=8,
        seed=3,
        extra_body={
            "min_p": 0.05,
            "dry_multiplier": 0.8,
            "xtc_probability": 0.5,
            "top_n_sigma": 2.0,
            "mirostat": 0,
            "dynatemp_range": 0.3,
            "repeat_penalty": 1.1,
            "samplers": "llama.cpp",
        },
    )
    assert llama.usage.completion_tokens <= 8
    stopped = client.completions.create(
        model="smollm2", prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"]
    )
    assert stopped.choices[0].finish_reason == "stop" and " 7" not in stopped.choices[0].text
    lp = client.chat.completions.create(
        model="smollm2", messages=MESSAGES[0], max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = lp.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)  # greedy: the top one


def test_response_format_json_schema(client: Any) -> None:
    pytest.importorskip("llguidance")
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    out = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Give me a person as JSON."}],
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    )
    value = json.loads(out.choices[0].message.content)
    assert set(value) == {"name", "age"} and isinstance(value["age"], int)


def test_errors_are_openai_style(server: RunningServer, client: Any) -> None:
    import httpx

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm2", prompt="x", max_tokens=4, temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm2", prompt="x", max_tokens=10**9)
    assert e.value.body["param"] == "max_tokens"
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers=h)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server.url + "/v1/completions", content=b"x" * (2 << 20), headers=h)
    assert r.status_code == 413
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "bogus": 1}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "bogus"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_score_endpoint_and_lm_eval_local_completions(
    server: RunningServer, smollm2_path: Any, smollm2: Any, smollm2_tokenizer: Any
) -> None:
    import httpx

    ref = score_many(IncrementalHF(smollm2), smollm2_tokenizer, TEXT_REQUESTS)
    body = {"requests": [{"context": c, "options": o} for c, o in TEXT_REQUESTS]}
    r = httpx.post(
        server.url + "/v1/score", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120
    )
    assert r.status_code == 200, r.text
    for res, sc in zip(r.json()["results"], ref, strict=True):
        for got, exp in zip(res["options"], sc, strict=True):
            assert abs(got["loglikelihood"] - exp.loglikelihood) < 1e-4 and got["is_greedy"] == exp.is_greedy

    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(
        base_url=server.url + "/v1/completions",
        model="smollm2",
        tokenizer=str(smollm2_path),
        tokenizer_backend="huggingface",
        num_concurrent=4,
        max_retries=1,
        header={"Authorization": f"Bearer {KEY}"},
    )
    reqs = [
        Instance("loglikelihood", {}, (c, o), i) for i, (c, opts) in enumerate(TEXT_REQUESTS) for o in opts
    ]
    theirs = lm.loglikelihood(reqs, disable_tqdm=True)
    ours = [(s.loglikelihood, s.is_greedy) for sc in ref for s in sc]
    for (a, ga), (b, gb) in zip(theirs, ours, strict=True):
        assert abs(a - b) < 1e-4 and ga == gb


def test_disconnect_cancels_the_row(server: RunningServer) -> None:
    import time

    import httpx

    h = {"Authorization": f"Bearer {KEY}"}
    body = {
        "prompt": "Count to a thousand:",
        "max_tokens": 400,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=h, timeout=60) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n >= 4:
                break
    deadline = time.monotonic() + 8  # 400 tokens would take ~25 s if the row kept decoding
    while httpx.get(server.url + "/health").json()["rows"] > 0:
        assert time.monotonic() < deadline, "the disconnected request still holds its row"
        time.sleep(0.2)
