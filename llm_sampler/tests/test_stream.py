"""The text streamer on the real SmolLM2 tokenizer (byte-level BPE) with multi-byte and merged tokens."""

from __future__ import annotations

from typing import Any

import torch

from llm_sampler import TextStreamer, generate

TEXTS = [
    "Hello 🙂🙂 world 日本語のテキスト, naïve café 👩‍👩‍👧 end",
    "  leading spaces,   runs of spaces\n\nand newlines 😀\t tabs",
    "中文字符和表情符号🎉🎉🎉混合在一起。Ελληνικά και русский текст.",
]


def test_streamer_joins_to_decode(smollm2_tokenizer: Any) -> None:
    for text in TEXTS:
        ids = smollm2_tokenizer.encode(text)
        pieces = list(TextStreamer(smollm2_tokenizer)(ids))
        assert "".join(pieces) == smollm2_tokenizer.decode(ids) == text
        assert not any("\ufffd" in p for p in pieces)
        # byte-level BPE splits emoji into several tokens: a piece is emitted only once a character is whole
        assert len(pieces) < len(ids) or all(len(p) for p in pieces)


def test_streamer_with_tokenizers_tokenizer(smollm2_path: Any, smollm2_tokenizer: Any) -> None:
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(smollm2_path / "tokenizer.json"))
    for text in TEXTS:
        ids = raw.encode(text).ids
        streamer = TextStreamer(raw)
        pieces = [streamer.push(torch.tensor(t)) for t in ids] + [streamer.end()]
        assert "".join(pieces) == text


def test_streamer_holds_back_partial_character(smollm2_tokenizer: Any) -> None:
    ids = smollm2_tokenizer.encode("🙂")
    assert len(ids) > 1  # several byte tokens
    streamer = TextStreamer(smollm2_tokenizer)
    assert [streamer.push(t) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert streamer.push(ids[-1]) == "🙂"
    streamer = TextStreamer(smollm2_tokenizer.decode)
    streamer.push(ids[0])
    assert streamer.end() == "\ufffd"  # an incomplete character at the very end, as decode() gives it


def test_streams_a_generation(smollm2_tokenizer: Any) -> None:
    table = torch.full((4, 49152), -100.0)
    ids = smollm2_tokenizer.encode("日本🙂")
    for i, t in enumerate(ids[1:]):  # a fake model that spells the text token by token
        table[i, t] = 0.0

    def forward(x: torch.Tensor) -> torch.Tensor:
        return table[x.shape[1] - 1].expand(x.shape[0], x.shape[1], -1)

    out = generate(forward, [ids[0]], len(ids) - 1, temperature=0)
    text = "".join(TextStreamer(smollm2_tokenizer)(out.sequences[0]))
    assert text == "日本🙂"
