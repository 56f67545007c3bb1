"""Token ids -> text, incrementally, correct across multi-byte characters and merged tokens.

Decoding each token on its own is wrong: a byte-level BPE token may hold half of a UTF-8 character, and
SentencePiece-style tokenizers drop or merge spaces depending on the neighbouring tokens. So the streamer
decodes a short window of recent tokens (from `prefix` to the end), compares it with the decoding of the
same window without the newest tokens (from `prefix` to `read`), and emits the difference only when the
text does not end inside a character (U+FFFD, the replacement character). Then the window slides.
(The method of Hugging Face's text-generation-inference.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

REPLACEMENT = "\ufffd"


def _decoder(tokenizer_or_decode: Any) -> Callable[[list[int]], str]:
    if hasattr(tokenizer_or_decode, "decode"):
        return lambda ids: tokenizer_or_decode.decode(ids)
    if callable(tokenizer_or_decode):
        return tokenizer_or_decode
    raise TypeError("TextStreamer needs a tokenizer with decode() or a decode function list[int] -> str")


class TextStreamer:
    """`push(token_id) -> new text` (maybe ""), `end() -> the rest`. The pieces join to `decode(all ids)`.

    Works with a Hugging Face tokenizer, a `tokenizers.Tokenizer` or any `decode(list[int]) -> str`.
    """

    def __init__(self, tokenizer_or_decode: Any) -> None:
        self.decode = _decoder(tokenizer_or_decode)
        self.ids: list[int] = []
        self.prefix = 0  # start of the decoding window
        self.read = 0  # tokens whose text was emitted

    def push(self, token_id: int | torch.Tensor) -> str:
        self.ids.append(int(token_id))
        before = self.decode(self.ids[self.prefix : self.read])
        text = self.decode(self.ids[self.prefix :])
        if len(text) > len(before) and not text.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before) :]
        return ""

    def end(self) -> str:
        """The text still held back (an incomplete character at the very end decodes as U+FFFD)."""
        before = self.decode(self.ids[self.prefix : self.read])
        text = self.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(before) :]

    def __call__(self, tokens: Iterable[int | torch.Tensor]) -> Iterator[str]:
        """Stream text pieces from a stream of token ids (one row: ints or 0-d/1-element tensors)."""
        for t in tokens:
            piece = self.push(int(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else t)
            if piece:
                yield piece
        rest = self.end()
        if rest:
            yield rest
