"""Structured output with SmolLM2-135M-Instruct through llguidance: every output satisfies its constraint."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import torch

from llm_sampler import IncrementalHF, generate

SCHEMA = {
    "type": "object",
    "properties": {
        "pet": {
            "type": "object",
            "properties": {
                "kind": {"enum": ["cat", "dog", "fish"]},
                "age": {"type": "integer", "minimum": 0, "maximum": 30},
            },
            "required": ["kind", "age"],
            "additionalProperties": False,
        },
        "weight": {"type": "number", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["pet", "weight", "tags"],
    "additionalProperties": False,
}


def prompts(tok: Any, texts: list[str]) -> list[list[int]]:
    chats = [[{"role": "user", "content": t}] for t in texts]
    return [
        tok(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False)).input_ids for c in chats
    ]


def texts_of(tok: Any, out: Any) -> list[str]:
    return [tok.decode(r, skip_special_tokens=True) for r in out.new_tokens]


def test_json_schema_twenty_prompts_parse_and_validate(smollm2: Any, smollm2_tokenizer: Any) -> None:
    import jsonschema

    tok = smollm2_tokenizer
    ids = prompts(
        tok, [f"Describe pet number {i} as JSON with its kind, age, weight and tags." for i in range(20)]
    )
    with torch.no_grad():
        out = generate(
            IncrementalHF(smollm2), ids, 60, json_schema=SCHEMA, tokenizer=tok, seed=list(range(20))
        )
    for text in texts_of(tok, out):
        jsonschema.validate(json.loads(text), SCHEMA)


def test_regex_and_choices_always_match(smollm2: Any, smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    ids = prompts(tok, ["When did the war end?", "Give me a date.", "Your birthday?", "Today is"])
    with torch.no_grad():
        dates = generate(
            IncrementalHF(smollm2),
            ids,
            12,
            regex=r"[0-9]{4}-[0-9]{2}-[0-9]{2}",
            tokenizer=tok,
            seed=[1, 2, 3, 4],
        )
        answers = generate(
            IncrementalHF(smollm2), ids, 6, choices=["yes", "no", "maybe so"], tokenizer=tok, seed=0
        )
    assert all(re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", t) for t in texts_of(tok, dates)), texts_of(
        tok, dates
    )
    assert all(t in ("yes", "no", "maybe so") for t in texts_of(tok, answers)), texts_of(tok, answers)


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"json_schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}, "json_schema"),
        ({"regex": "(unclosed"}, "regex"),
        ({"choices": []}, "choices"),
        ({"choices": "yes"}, "choices"),
        ({"grammar": "start: @@@"}, "grammar"),
        ({"regex": r"\d", "choices": ["a"]}, "constraint"),
    ],
)
def test_bad_constraints_raise_before_any_forward(
    smollm2_tokenizer: Any, params: dict[str, Any], name: str
) -> None:
    calls: list[int] = []

    def f(ids: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return torch.zeros(ids.shape[0], 49152)

    with pytest.raises(ValueError, match=name):
        generate(f, [1, 2], 3, tokenizer=smollm2_tokenizer, **params)
    assert calls == []


def test_constraint_needs_a_tokenizer() -> None:
    with pytest.raises(ValueError, match="tokenizer"):
        generate(lambda ids: torch.zeros(ids.shape[0], 10), [1, 2], 3, regex="a")
