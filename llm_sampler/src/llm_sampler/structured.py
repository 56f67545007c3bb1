"""Structured output: `json_schema=`, `regex=`, `choices=`, `grammar=` (Lark or GBNF) with `tokenizer=`.

Backed by llguidance (the optional extra `llm-sampler[structured]`, imported lazily). One matcher per row;
the next step's token mask is computed in a worker thread while forward_func runs (llguidance drops the
GIL), then applied to the logits as -inf. A row finishes when its constraint is complete: the matcher is
stopped, or it accepts and the chosen token is eos.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from weakref import WeakKeyDictionary

import torch

_TOKENIZERS: WeakKeyDictionary[Any, Any] = WeakKeyDictionary()
_SHIFTS = torch.arange(32, dtype=torch.int32)


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.torch
    except ImportError as e:
        raise ImportError(
            "json_schema=, regex=, choices= and grammar= need llguidance: pip install 'llm-sampler[structured]'"
        ) from e
    return llguidance


def grammar_text(
    json_schema: Any = None,
    regex: str | None = None,
    choices: Sequence[str] | None = None,
    grammar: str | None = None,
) -> tuple[str, str] | None:
    """-> (parameter name, llguidance grammar) for the one constraint given, or None."""
    given = {
        k: v
        for k, v in (
            ("json_schema", json_schema),
            ("regex", regex),
            ("choices", choices),
            ("grammar", grammar),
        )
        if v is not None
    }
    if not given:
        return None
    if len(given) > 1:
        raise ValueError(f"give one constraint, not {sorted(given)}")
    name, value = next(iter(given.items()))
    M = _llguidance().LLMatcher
    if name == "json_schema":
        if hasattr(value, "model_json_schema"):  # a pydantic model
            value = value.model_json_schema()
        if not isinstance(value, (dict, str)):
            raise ValueError(
                f"json_schema must be a dict, a JSON string or a pydantic model, got {type(value).__name__}"
            )
        try:
            schema = json.loads(value) if isinstance(value, str) else value
            return name, M.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        except Exception as e:  # llguidance raises its own error types for schemas it rejects
            raise ValueError(f"json_schema is rejected by llguidance: {e}") from e
    if name == "regex":
        if not isinstance(value, str) or not value:
            raise ValueError(f"regex must be a non-empty string, got {value!r}")
        return name, M.grammar_from_regex(value)
    if name == "choices":
        if isinstance(value, str) or not value or not all(isinstance(c, str) and c for c in value):
            raise ValueError(f"choices must be a list of non-empty strings, got {value!r}")
        return name, M.grammar_from_regex("|".join(re.escape(c) for c in value))
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"grammar must be a Lark or GBNF grammar string, got {value!r}")
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        lark = any_to_lark(value)
    except Exception as e:
        raise ValueError(f"grammar does not parse as Lark or GBNF: {e}") from e
    return name, M.grammar_from_lark(lark)


def lltokenizer(tokenizer: Any) -> Any:
    """The llguidance tokenizer of an HF fast tokenizer, built once per tokenizer (~1 s)."""
    if tokenizer is None:
        raise ValueError(
            "json_schema=, regex=, choices= and grammar= need tokenizer= (a Hugging Face fast tokenizer)"
        )
    try:
        return _TOKENIZERS[tokenizer]
    except (KeyError, TypeError):
        pass
    try:
        tok = _from_tokenizer(tokenizer)
    except ImportError:
        raise
    except Exception as e:
        raise ValueError(f"tokenizer must be a Hugging Face fast tokenizer: {e}") from e
    with contextlib.suppress(TypeError):  # a tokenizer that cannot be weakly referenced is not cached
        _TOKENIZERS[tokenizer] = tok
    return tok


def _from_tokenizer(tokenizer: Any) -> Any:
    lg = _llguidance()
    if type(tokenizer).__name__ == "JsonTokenizer":  # llm_sampler.tokenizer: no transformers needed
        backend = copy.copy(tokenizer.backend_tokenizer)
        backend.no_padding()
        backend.no_truncation()
        return lg.LLTokenizer(backend.to_str(), eos_token=tokenizer.eos_token_id)
    import llguidance.hf  # imports transformers

    return llguidance.hf.from_tokenizer(tokenizer)


class Constraint:
    """Per-row matchers over one grammar. `start()` begins the mask of the next step (in a thread),
    `apply(scores)` waits for it and bans what the grammar forbids, `advance(tokens)` consumes the chosen
    tokens and says which rows the grammar has completed."""

    def __init__(self, name: str, grammar: str, tokenizer: Any, rows: int) -> None:
        lg = _llguidance()
        self.tok = lltokenizer(tokenizer)
        error = lg.LLMatcher.validate_grammar(grammar, self.tok)
        if error:
            raise ValueError(f"{name} is rejected by llguidance: {error}")
        self.matchers = [lg.LLMatcher(self.tok, grammar, log_level=0) for _ in range(rows)]
        if self.matchers[0].is_error():
            raise ValueError(f"{name} is rejected by llguidance: {self.matchers[0].get_error()}")
        self.eos = int(self.tok.eos_token)
        self.bitmask = lg.torch.allocate_token_bitmask(rows, self.tok.vocab_size)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="llm_sampler-mask")
        self.pending: Future[None] | None = None
        self.active = list(range(rows))
        self._fill = lg.torch.fill_next_token_bitmask

    def _compute(self, rows: list[int]) -> None:
        for r in rows:
            self._fill(self.matchers[r], self.bitmask, r)

    def start(self) -> None:
        """Compute the next mask in the worker thread (call just before forward_func)."""
        self.pending = self.pool.submit(self._compute, list(self.active))

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """bool [B, vocab_size]: the tokens each row's grammar allows now."""
        if self.pending is None:
            self.start()
        assert self.pending is not None
        self.pending.result()
        self.pending = None
        bits = (self.bitmask[:, :, None] >> _SHIFTS) & 1  # (B, words, 32)
        allowed = bits.reshape(bits.shape[0], -1).bool()
        if allowed.shape[1] >= vocab_size:
            return allowed[:, :vocab_size]
        pad = torch.zeros(allowed.shape[0], vocab_size - allowed.shape[1], dtype=torch.bool)
        return torch.cat([allowed, pad], 1)

    def apply(self, scores: torch.Tensor) -> torch.Tensor:
        allowed = self.allowed(scores.shape[-1]).to(scores.device)
        return scores.masked_fill(~allowed, float("-inf"))

    def advance(self, tokens: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
        """Consume each live row's token; -> bool [B] rows the constraint has completed."""
        done = torch.zeros_like(finished)
        for r, t in enumerate(tokens.tolist()):
            if bool(finished[r]):
                continue
            m = self.matchers[r]
            if t == self.eos and m.is_accepting():
                done[r] = True
                continue
            if not m.consume_token(t):
                raise RuntimeError(f"row {r}: the constraint rejected token {t}: {m.get_error()}")
            if m.is_stopped():
                done[r] = True
        self.active = [r for r in range(len(self.matchers)) if not bool(finished[r] | done[r])]
        return done

    def close(self) -> None:
        self.pool.shutdown(wait=True)
