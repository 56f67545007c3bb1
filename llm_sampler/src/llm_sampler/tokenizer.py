"""A Hugging Face tokenizer directory (`tokenizer.json`, `tokenizer_config.json`, the chat template) read
without transformers: the `tokenizers` library encodes and decodes, jinja2 renders the chat template in a
sandbox as transformers does. It is what the server and structured output need of a tokenizer, so a
model directory is served with only the `server` extra installed.

    tok = load_tokenizer("SmolLM2-135M-Instruct")
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True))
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

# transformers' clean_up_tokenization: the spaces its old tokenizers put before punctuation
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # fmt: skip
_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # an AddedToken serialised by transformers
        value = value.get("content")
    return value if isinstance(value, str) else None


class JsonTokenizer:
    """encode / decode / apply_chat_template / eos_token_id ... over a tokenizer directory."""

    def __init__(self, directory: str | Path) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError(
                "load_tokenizer needs the tokenizers library: pip install 'llm-sampler[server]'"
            ) from e
        self.directory = Path(directory)
        path = self.directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: a tokenizer directory needs tokenizer.json")
        try:
            self.backend_tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: not a tokenizers JSON file: {e}") from e
        config_path = self.directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        if not isinstance(config, dict):
            raise ValueError(f"{config_path}: expected a JSON object")
        self.config = config
        self.special_tokens = {k: t for k in _SPECIAL if (t := _token_text(config.get(k))) is not None}
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.chat_template = self._chat_template(config)

    def _chat_template(self, config: Mapping[str, Any]) -> str | None:
        file = self.directory / "chat_template.jinja"
        if file.is_file():
            return file.read_text()
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) else None

    def _id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend_tokenizer.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    def __len__(self) -> int:
        return int(self.backend_tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        text = self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for before, after in _CLEANUP:
                text = text.replace(before, after)
        return str(text)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """The template rendered as transformers renders it (sandboxed jinja2, trim_blocks, lstrip_blocks)."""
        if self.chat_template is None:
            raise ValueError(f"{self.directory}: the tokenizer has no chat template")
        text = _render(
            self.chat_template,
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
            **kwargs,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _render(template: str, **variables: Any) -> str:
    return str(_compile(template).render(**variables))


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    """The compiled template (compiling takes milliseconds: once per template, not per request)."""
    try:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise ImportError("chat templates need jinja2: pip install 'llm-sampler[server]'") from e

    def raise_exception(message: str) -> None:
        raise ValueError(f"chat template: {message}")

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, **kw: Any) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, **kw)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def load_tokenizer(directory: str | Path) -> JsonTokenizer:
    """The tokenizer of a Hugging Face (or sepweight) model directory, without transformers."""
    return JsonTokenizer(directory)
