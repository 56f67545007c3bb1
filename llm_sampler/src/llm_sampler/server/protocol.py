"""OpenAI request bodies -> validated sampling parameters; streamed text with stop strings held back.

Every check raises `BadRequest(message, param)` naming the field, which the server turns into a 400 with
an OpenAI-style error body. Nothing here touches the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from llm_sampler.config import SamplingConfig


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# OpenAI / vLLM / llama.cpp field -> (SamplingConfig name, check, what is expected)
_NUM = (_is_num, "a number")
_INT = (_is_int, "an integer")
SAMPLING_FIELDS: dict[str, tuple[str, tuple[Callable[[Any], bool], str]]] = {
    "temperature": ("temperature", _NUM),
    "top_p": ("top_p", _NUM),
    "top_k": ("top_k", _INT),
    "min_p": ("min_p", _NUM),
    "typical_p": ("typical_p", _NUM),
    "presence_penalty": ("presence_penalty", _NUM),
    "frequency_penalty": ("frequency_penalty", _NUM),
    "repetition_penalty": ("repetition_penalty", _NUM),
    "repeat_penalty": ("repetition_penalty", _NUM),  # llama.cpp's name
    "min_tokens": ("min_new_tokens", _INT),
    "no_repeat_ngram_size": ("no_repeat_ngram_size", _INT),
    "dry_multiplier": ("dry_multiplier", _NUM),
    "dry_base": ("dry_base", _NUM),
    "dry_allowed_length": ("dry_allowed_length", _INT),
    "dry_penalty_last_n": ("dry_penalty_last_n", _INT),
    "xtc_probability": ("xtc_probability", _NUM),
    "xtc_threshold": ("xtc_threshold", _NUM),
    "top_n_sigma": ("top_n_sigma", _NUM),
    "mirostat": ("mirostat", _INT),
    "mirostat_tau": ("mirostat_tau", _NUM),
    "mirostat_eta": ("mirostat_eta", _NUM),
    "dynatemp_range": ("dynatemp_range", _NUM),
    "dynatemp_exponent": ("dynatemp_exponent", _NUM),
    "top_h": ("top_h", _NUM),
}
_IGNORED = {"model", "user", "stream_options", "suffix", "best_of", "service_tier", "store", "metadata"}
COMMON = {
    *SAMPLING_FIELDS,
    "max_tokens",
    "n",
    "stop",
    "seed",
    "logit_bias",
    "stream",
    "response_format",
    "samplers",
    "dry_sequence_breakers",
    "ignore_eos",
    *_IGNORED,
}
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "logprobs"}
CHAT_FIELDS = COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}


@dataclass
class Limits:
    max_tokens: int = 2048  # the most new tokens one request may ask for
    max_n: int = 8
    max_prompt_tokens: int | None = None  # default: what the model's max_seq_len leaves
    max_logprobs: int = 20


@dataclass
class Parsed:
    """What a generation request asks for: per-choice sampling kwargs (the seed still shared), n, stream."""

    params: dict[str, Any]
    max_tokens: int
    n: int
    stream: bool
    include_usage: bool
    stop: list[str]
    top_logprobs: int | None  # None: no log-probabilities
    seed: int | None


def check_fields(body: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", None)
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}", unknown[0])
    return body


def parse_common(body: Mapping[str, Any], tokenizer: Any, limits: Limits, *, chat: bool) -> Parsed:
    params: dict[str, Any] = {}
    for name, (target, (ok, expected)) in SAMPLING_FIELDS.items():
        v = body.get(name)
        if v is None:
            continue
        if not ok(v):
            raise BadRequest(f"{name} must be {expected}, got {v!r}", name)
        params[target] = v
    temperature = body.get("temperature", 1.0)
    if temperature is not None and (not _is_num(temperature) or not 0 <= temperature <= 2):
        raise BadRequest(f"temperature must be a number in [0, 2], got {temperature!r}", "temperature")
    for name in ("presence_penalty", "frequency_penalty"):
        v = body.get(name)
        if v is not None and not -2 <= v <= 2:
            raise BadRequest(f"{name} must be in [-2, 2], got {v!r}", name)
    max_name = (
        "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    )
    max_tokens = body.get(max_name)
    if max_tokens is None:
        max_tokens = min(limits.max_tokens, 256 if chat else 16)
    if not _is_int(max_tokens) or max_tokens < 0:
        raise BadRequest(f"{max_name} must be an integer >= 0, got {max_tokens!r}", max_name)
    if max_tokens > limits.max_tokens:
        raise BadRequest(
            f"{max_name} must be <= {limits.max_tokens} on this server, got {max_tokens}", max_name
        )
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not _is_int(n) or not 1 <= n <= limits.max_n:
        raise BadRequest(f"n must be an integer in [1, {limits.max_n}], got {n!r}", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"stream must be a boolean, got {stream!r}", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    include_usage = bool(opts.get("include_usage", False))
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 16 or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest("stop must be a non-empty string or a list of at most 16 of them", "stop")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not -(2**63) <= seed < 2**64):
        raise BadRequest(f"seed must be an integer, got {seed!r}", "seed")
    if seed is not None and seed < 0:
        seed += 2**64
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise BadRequest("logit_bias must be an object {token id: bias}", "logit_bias")
        try:
            params["logit_bias"] = {int(k): float(v) for k, v in bias.items()}
        except (TypeError, ValueError) as e:
            raise BadRequest(f"logit_bias must map token ids to numbers: {e}", "logit_bias") from e
        if any(not -100 <= v <= 100 or k < 0 for k, v in params["logit_bias"].items()):
            raise BadRequest("logit_bias values must be in [-100, 100] for token ids >= 0", "logit_bias")
    for name, key in (("samplers", "samplers"), ("dry_sequence_breakers", "dry_sequence_breakers")):
        v = body.get(name)
        if v is not None:
            if not (isinstance(v, list) or (name == "samplers" and isinstance(v, str))):
                raise BadRequest(f"{name} must be a list of strings", name)
            params[key] = v
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise BadRequest("ignore_eos must be a boolean", "ignore_eos")
    eos = getattr(tokenizer, "eos_token_id", None)
    if not ignore_eos and eos is not None:
        params["eos_token_id"] = eos
    if stops:
        params["stop_strings"] = stops
    params["decode"] = tokenizer.decode
    fmt = body.get("response_format")
    if fmt is not None:
        params.update(_response_format(fmt, tokenizer))
    top = _logprobs(body, limits, chat=chat)
    return Parsed(params, max_tokens, n, stream, include_usage, stops, top, seed)


def _response_format(fmt: Any, tokenizer: Any) -> dict[str, Any]:
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise BadRequest(
            'response_format must be {"type": "text" | "json_object" | "json_schema", ...}', "response_format"
        )
    if fmt["type"] == "text":
        return {}
    if fmt["type"] == "json_object":
        schema: Any = {"type": "object"}
    else:
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise BadRequest(
                'response_format.json_schema must be {"name": ..., "schema": {...}}', "response_format"
            )
        schema = spec["schema"]
    return {"json_schema": schema, "tokenizer": tokenizer}


def _logprobs(body: Mapping[str, Any], limits: Limits, *, chat: bool) -> int | None:
    lp = body.get("logprobs")
    if chat:
        if lp is not None and not isinstance(lp, bool):
            raise BadRequest("logprobs must be a boolean", "logprobs")
        top = body.get("top_logprobs")
        if top is not None and (not _is_int(top) or not 0 <= top <= limits.max_logprobs):
            raise BadRequest(f"top_logprobs must be an integer in [0, {limits.max_logprobs}]", "top_logprobs")
        if top is not None and not lp:
            raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
        return (top or 0) if lp else None
    if lp is None:
        return None
    if not _is_int(lp) or not 0 <= lp <= limits.max_logprobs:
        raise BadRequest(f"logprobs must be an integer in [0, {limits.max_logprobs}], got {lp!r}", "logprobs")
    return lp


def choice_config(parsed: Parsed, choice: int) -> SamplingConfig:
    """The `SamplingConfig` of choice `choice`: `generate`'s seed convention (seed + j for the j-th)."""
    params = dict(parsed.params)
    if parsed.seed is not None:
        params["seed"] = (parsed.seed + choice) % 2**64
    try:
        return SamplingConfig.from_kwargs(params)
    except (ValueError, TypeError) as e:
        message = str(e)
        first = message.split(" ", 1)[0]
        back = {v[0]: k for k, v in SAMPLING_FIELDS.items()}
        param = back.get(first, first if first in COMMON else None)
        raise BadRequest(message, param) from e


def chat_prompt(body: Mapping[str, Any], tokenizer: Any) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content}", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a role", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            texts = []
            for part in content:
                if (
                    not isinstance(part, dict)
                    or part.get("type") != "text"
                    or not isinstance(part.get("text"), str)
                ):
                    raise BadRequest(f"messages[{i}].content parts must be text parts", "messages")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string", "messages")
        clean.append({"role": m["role"], "content": content})
    if getattr(tokenizer, "chat_template", None) is None:
        raise BadRequest("this model's tokenizer has no chat template: use /v1/completions", "messages")
    try:
        text = tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # a template may raise on roles it does not know
        raise BadRequest(f"the chat template rejects these messages: {e}", "messages") from e
    return list(tokenizer.encode(text, add_special_tokens=False))


def completion_prompts(body: Mapping[str, Any], tokenizer: Any) -> list[list[int]]:
    """`prompt`: a string, a list of strings, a list of token ids, or a list of lists of token ids."""
    p = body.get("prompt")
    if isinstance(p, str):
        prompts: list[Any] = [p]
    elif isinstance(p, list) and p and all(_is_int(t) for t in p):
        prompts = [p]
    elif isinstance(p, list) and p:
        prompts = p
    else:
        raise BadRequest("prompt must be a string, a list of strings or a list of token id lists", "prompt")
    out = []
    vocab = len(tokenizer)
    for x in prompts:
        if isinstance(x, str):
            ids = list(tokenizer.encode(x)) if x else []
        elif isinstance(x, list) and all(_is_int(t) and 0 <= t < vocab for t in x):
            ids = list(x)
        else:
            raise BadRequest(f"prompt items must be strings or lists of token ids in [0, {vocab})", "prompt")
        if not ids:
            bos = getattr(tokenizer, "bos_token_id", None)
            bos = bos if bos is not None else getattr(tokenizer, "eos_token_id", None)
            if bos is None:
                raise BadRequest("prompt is empty", "prompt")
            ids = [bos]
        out.append(ids)
    return out


class TextTracker:
    """Decodes one choice's tokens as they come; holds back text that may still become a stop string or
    an incomplete UTF-8 character. `push(token) -> new text`, `stopped` once a stop string is met (the
    text ends before it, as OpenAI's)."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str], eos: int | None = None) -> None:
        self.decode, self.stops, self.eos = decode, stops, eos
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def _visible(self, final: bool) -> str:
        text = self.decode(self.tokens)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return text[:cut]
        if final:
            return text
        if text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        return text[: len(text) - self.hold] if self.hold else text

    def push(self, token: int) -> str:
        if self.stopped or token == self.eos:  # eos ends the text, it is not part of it
            return ""
        self.tokens.append(token)
        return self._delta(self._visible(False))

    def finish(self) -> str:
        if self.stopped:
            return ""
        return self._delta(self._visible(True))

    def _delta(self, visible: str) -> str:
        if not visible.startswith(self.sent):  # a decode that changed earlier text: send nothing new
            return ""
        delta = visible[len(self.sent) :]
        self.sent = visible
        return delta
