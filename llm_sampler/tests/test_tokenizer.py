"""llm_sampler.tokenizer (no transformers at run time) against transformers' AutoTokenizer on the real
fixtures: the same ids, text, chat prompts and structured-output masks."""

from __future__ import annotations

from pathlib import Path

import fixtures
import pytest
import torch
from transformers import AutoTokenizer

from llm_sampler import generate
from llm_sampler.tokenizer import load_tokenizer

TEXTS = [
    "Hello, world!",
    "  leading spaces and a tab\there",
    "Unicode: café, naïve, 日本語, emoji 🙂",
    "<|im_start|>user\nspecial tokens inside<|im_end|>",
    "",
]
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another."},
    ],
]


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def pair(request: pytest.FixtureRequest) -> tuple[object, object]:
    path = Path(fixtures.real_checkpoint(request.param))
    return load_tokenizer(path), AutoTokenizer.from_pretrained(path)


def test_encode_decode_match_transformers(pair: tuple) -> None:
    ours, hf = pair
    assert len(ours) == len(hf)
    assert (ours.eos_token_id, ours.bos_token_id) == (hf.eos_token_id, hf.bos_token_id)
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == hf.encode(text, add_special_tokens=special), text
            assert ours.decode(ids) == hf.decode(ids), text
            assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_chat_template_matches_transformers(pair: tuple) -> None:
    ours, hf = pair
    if hf.chat_template is None:
        assert ours.chat_template is None
        with pytest.raises(ValueError, match="no chat template"):
            ours.apply_chat_template(CHATS[0])
        return
    for chat in CHATS:
        for gen in (True, False):
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == hf.apply_chat_template(
                chat, add_generation_prompt=gen, tokenize=False
            )


def test_structured_output_with_our_tokenizer_equals_hf_tokenizer(smollm2: object) -> None:
    pytest.importorskip("llguidance")
    path = Path(fixtures.real_checkpoint("smollm2"))
    ours, hf = load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    ids = [hf("The date today is").input_ids]
    f = lambda x: smollm2(x).logits  # noqa: E731
    kw = {"temperature": 0, "regex": "20[0-9]{2}-[01][0-9]-[0-3][0-9]"}
    a = generate(f, ids, 12, tokenizer=ours, **kw)
    b = generate(f, ids, 12, tokenizer=hf, **kw)
    assert torch.equal(a.new_tokens, b.new_tokens)


def test_missing_tokenizer_json_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path)
