"""Sampling parameters: one dataclass, validated, that builds the processor lists."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from llm_sampler import chain as C
from llm_sampler import processors as P
from llm_sampler import samplers as S


def _check(ok: bool, name: str, expected: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


@dataclass
class SamplingConfig:
    """Every parameter of `sample`/`generate` (see the README for each one's meaning).

    `temperature=0` is greedy decoding (the warpers are then ignored, the token processors still apply).
    `repetition_penalty` counts the prompt's tokens unless `penalize_prompt=False`; presence and frequency
    penalties count generated tokens only.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    epsilon_cutoff: float | None = None
    eta_cutoff: float | None = None
    repetition_penalty: float = 1.0
    penalize_prompt: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    bad_words_ids: Sequence[Sequence[int]] | None = None
    logit_bias: Mapping[int, float] | None = None
    min_new_tokens: int = 0
    eos_token_id: int | Sequence[int] | None = None
    pad_token_id: int | None = None
    stop_sequences: Sequence[Sequence[int]] | None = None
    stop_strings: Sequence[str] | None = None
    decode: Callable[[list[int]], str] | None = None
    max_time: float | None = None
    seed: int | Sequence[int] | None = None
    num_return_sequences: int = 1
    return_logprobs: bool = False
    logits_processors: Sequence[P.LogitsProcessor] = field(default_factory=list)
    # llama.cpp's samplers (llm_sampler.samplers), every one off by default
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1
    dry_sequence_breakers: Sequence[str] = field(default_factory=lambda: ["\n", ":", '"', "*"])
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    top_n_sigma: float = -1.0
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    top_h: float | None = None
    samplers: str | Sequence[str] | None = None  # llm_sampler.chain: None = transformers' order
    # structured output (llm_sampler.structured, the extra llm-sampler[structured]): one of these
    json_schema: Any = None
    regex: str | None = None
    choices: Sequence[str] | None = None
    grammar: str | None = None
    tokenizer: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.stop_strings, str):  # one stop string, not a list of its characters
            self.stop_strings = [self.stop_strings]

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> SamplingConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown sampling parameter(s) {unknown}; valid ones: {sorted(known)}")
        config = cls(**kwargs)
        config.validate()
        return config

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        eos = self.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos)

    def validate(self) -> None:
        _check(
            _is_num(self.temperature) and 0 <= self.temperature < math.inf,
            "temperature",
            "a float >= 0 (0 = greedy)",
            self.temperature,
        )
        _check(
            self.top_k is None or (_is_int(self.top_k) and self.top_k >= 1),
            "top_k",
            "None or an int >= 1",
            self.top_k,
        )
        for name in ("top_p", "typical_p"):
            v = getattr(self, name)
            _check(v is None or (_is_num(v) and 0 < v <= 1), name, "None or a float in (0, 1]", v)
        for name in ("min_p", "epsilon_cutoff", "eta_cutoff"):
            v = getattr(self, name)
            _check(v is None or (_is_num(v) and 0 <= v < 1), name, "None or a float in [0, 1)", v)
        _check(
            _is_num(self.repetition_penalty) and 0 < self.repetition_penalty < math.inf,
            "repetition_penalty",
            "a float > 0 (1 = off)",
            self.repetition_penalty,
        )
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _check(_is_num(v) and -math.inf < v < math.inf, name, "a finite float", v)
        _check(
            _is_int(self.no_repeat_ngram_size) and self.no_repeat_ngram_size >= 0,
            "no_repeat_ngram_size",
            "an int >= 0 (0 = off)",
            self.no_repeat_ngram_size,
        )
        _check(
            _is_int(self.min_new_tokens) and self.min_new_tokens >= 0,
            "min_new_tokens",
            "an int >= 0",
            self.min_new_tokens,
        )
        _check(
            _is_int(self.num_return_sequences) and self.num_return_sequences >= 1,
            "num_return_sequences",
            "an int >= 1",
            self.num_return_sequences,
        )
        _check(
            self.max_time is None or (_is_num(self.max_time) and self.max_time > 0),
            "max_time",
            "None or seconds > 0",
            self.max_time,
        )
        eos = self.eos_token_id
        eos_ok = eos is None or (isinstance(eos, int) and _is_int(eos) and eos >= 0)
        eos_ok = eos_ok or (
            isinstance(self.eos_token_id, Sequence) and all(_is_int(t) and t >= 0 for t in self.eos_token_id)
        )
        _check(eos_ok, "eos_token_id", "None, a token id >= 0 or a list of them", self.eos_token_id)
        _check(
            self.pad_token_id is None or (_is_int(self.pad_token_id) and self.pad_token_id >= 0),
            "pad_token_id",
            "None or a token id >= 0",
            self.pad_token_id,
        )
        if self.min_new_tokens and not self.eos_ids:
            raise ValueError("min_new_tokens needs eos_token_id (the tokens to forbid before the minimum)")
        for name in ("bad_words_ids", "stop_sequences"):
            v = getattr(self, name)
            ok = v is None or all(len(w) >= 1 and all(_is_int(t) and t >= 0 for t in w) for w in v)
            _check(ok, name, "None or a list of non-empty lists of token ids >= 0", v)
        if self.logit_bias is not None:
            ok = all(
                _is_int(k) and k >= 0 and isinstance(b, (int, float)) and not math.isnan(b)
                for k, b in self.logit_bias.items()
            )
            _check(ok, "logit_bias", "a mapping {token id >= 0: float bias}", self.logit_bias)
        if self.stop_strings:
            _check(
                all(isinstance(s, str) and s for s in self.stop_strings),
                "stop_strings",
                "a list of non-empty strings",
                self.stop_strings,
            )
            if self.decode is None:
                raise ValueError(
                    "stop_strings needs decode= (a function list[int] -> str, e.g. tokenizer.decode)"
                )
        seeds = [] if self.seed is None else [self.seed] if not isinstance(self.seed, Sequence) else self.seed
        seed_ok = not isinstance(self.seed, (str, bytes)) and all(
            _is_int(s) and 0 <= s < 2**64 for s in seeds
        )
        _check(seed_ok, "seed", "None, an int in [0, 2**64) or a list of them (one per prompt)", self.seed)
        for name in ("penalize_prompt", "return_logprobs"):
            _check(isinstance(getattr(self, name), bool), name, "a bool", getattr(self, name))
        _check(self.decode is None or callable(self.decode), "decode", "None or a callable", self.decode)
        self._validate_llama_cpp()
        C.resolve(self.samplers)
        for i, p in enumerate(self.logits_processors):
            _check(callable(p), f"logits_processors[{i}]", "a callable (input_ids, scores) -> scores", p)

    def _validate_llama_cpp(self) -> None:
        def num(name: str, ok: Callable[[float], bool], expected: str) -> None:
            v = getattr(self, name)
            _check(_is_num(v) and math.isfinite(v) and ok(v), name, expected, v)

        num("dry_multiplier", lambda v: v >= 0, "a float >= 0 (0 = off)")
        num("dry_base", lambda v: v >= 1, "a float >= 1")
        for name in ("dry_allowed_length", "dry_penalty_last_n", "mirostat"):
            _check(_is_int(getattr(self, name)), name, "an int", getattr(self, name))
        _check(self.dry_allowed_length >= 1, "dry_allowed_length", "an int >= 1", self.dry_allowed_length)
        _check(
            self.dry_penalty_last_n >= -1,
            "dry_penalty_last_n",
            "-1 (all) or an int >= 0",
            self.dry_penalty_last_n,
        )
        breakers = self.dry_sequence_breakers
        ok = not isinstance(breakers, str) and all(isinstance(b, str) and b for b in breakers)
        _check(ok, "dry_sequence_breakers", "a list of non-empty strings", breakers)
        if self.dry_multiplier and breakers and self.decode is None:
            raise ValueError(
                "dry_sequence_breakers needs decode= (e.g. tokenizer.decode) to find the breaker tokens; "
                "pass dry_sequence_breakers=[] for none"
            )
        num("xtc_probability", lambda v: 0 <= v <= 1, "a float in [0, 1] (0 = off)")
        num("xtc_threshold", lambda v: 0 <= v <= 1, "a float in [0, 1]")
        num("top_n_sigma", lambda v: v > 0 or v == -1, "-1 (off) or a float > 0")
        _check(self.mirostat in (0, 1, 2), "mirostat", "0 (off), 1 or 2", self.mirostat)
        num("mirostat_tau", lambda v: v > 0, "a float > 0")
        num("mirostat_eta", lambda v: v > 0, "a float > 0")
        num("dynatemp_range", lambda v: v >= 0, "a float >= 0 (0 = off)")
        num("dynatemp_exponent", lambda v: v > 0, "a float > 0")
        v = self.top_h
        _check(v is None or (_is_num(v) and 0 < v <= 1), "top_h", "None or a float in (0, 1]", v)
        if self.mirostat and self.greedy:
            raise ValueError("mirostat samples: it needs temperature > 0")

    def llama_cpp_processors(self) -> list[P.LogitsProcessor]:
        """Full-vocabulary processors after the token processors and before top-k: DRY, top-nσ."""
        out: list[P.LogitsProcessor] = []
        if self.dry_multiplier:
            breakers = S.dry.BreakerTable(self.dry_sequence_breakers, self.decode)
            out.append(
                S.DRY(
                    self.dry_multiplier,
                    self.dry_base,
                    self.dry_allowed_length,
                    self.dry_penalty_last_n,
                    breakers,
                )
            )
        if self.top_n_sigma > 0:
            out.append(S.TopNSigma(self.top_n_sigma))
        return out

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids in the parameters must exist in the model's vocabulary."""
        ids: list[tuple[str, int]] = [("eos_token_id", t) for t in self.eos_ids]
        ids += [("bad_words_ids", t) for w in self.bad_words_ids or [] for t in w]
        ids += [("logit_bias", t) for t in self.logit_bias or {}]
        for name, t in ids:
            if t >= vocab_size:
                raise ValueError(f"{name} holds token id {t}, outside the vocabulary of {vocab_size} tokens")

    def token_processors(self, prompt_len: int, penalties: bool = True) -> list[P.LogitsProcessor]:
        """Processors that need the token ids, in the documented order (see `llm_sampler.processors`)."""
        out: list[P.LogitsProcessor] = []
        if self.logit_bias:
            out.append(P.LogitBias(self.logit_bias))
        if penalties and self.repetition_penalty != 1.0:
            out.append(
                P.RepetitionPenalty(self.repetition_penalty, 0 if self.penalize_prompt else prompt_len)
            )
        if penalties and (self.presence_penalty or self.frequency_penalty):
            out.append(P.PresenceFrequencyPenalty(self.presence_penalty, self.frequency_penalty, prompt_len))
        if self.no_repeat_ngram_size:
            out.append(P.NoRepeatNGram(self.no_repeat_ngram_size))
        if self.bad_words_ids:
            out.append(P.BadWords(self.bad_words_ids))
        if self.min_new_tokens:
            out.append(P.MinNewTokens(self.min_new_tokens, self.eos_ids, prompt_len))
        out.extend(self.logits_processors)
        return out

    def warpers(self) -> list[P.LogitsProcessor]:
        """Distribution-only processors after top-k (top-k itself is handled by the selector)."""
        out: list[P.LogitsProcessor] = []
        if self.top_p is not None and self.top_p < 1.0:
            out.append(P.TopP(self.top_p))
        if self.min_p:
            out.append(P.MinP(self.min_p))
        if self.typical_p is not None and self.typical_p < 1.0:
            out.append(P.TypicalP(self.typical_p))
        if self.epsilon_cutoff:
            out.append(P.EpsilonCutoff(self.epsilon_cutoff))
        if self.eta_cutoff:
            out.append(P.EtaCutoff(self.eta_cutoff))
        if self.top_h is not None:
            out.append(S.TopH(self.top_h))
        if self.xtc_probability:
            out.append(S.XTC(self.xtc_probability, self.xtc_threshold))
        return out
