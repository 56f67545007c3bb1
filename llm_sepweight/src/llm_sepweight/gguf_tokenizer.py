"""tokenizer.json and tokenizer_config.json rebuilt from a GGUF file's metadata, without transformers.

The JSON is the `tokenizers` library's serialization, written by hand. It follows what transformers builds
from the same metadata (its GGUF tokenizer loader is the reference the tests compare encodings with):
- `tokenizer.ggml.model == "gpt2"`: byte-level BPE with the file's merges;
- `"llama"` (sentencepiece): BPE with byte fallback, merges recovered from the vocabulary; Gemma files
  spell whitespace tokens with real spaces, keep no merges, and order them by position, not score.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from llm_sepweight.gguf import GGUFError

logger = logging.getLogger(__name__)

_CONTROL, _USER_DEFINED = 3, 4
# Merges are recovered only for tokens up to this many characters (real sentencepiece tokens stay under 100):
# every split of a token of n characters costs O(n) to look up, so one enormous token would cost O(n^2).
MAX_MERGE_TOKEN = 512

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> the split regex its merges were learned with (others: GPT-2's own ByteLevel regex).
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe", "pixtral"], _LLAMA3_SPLIT
    ),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez"], _QWEN2_SPLIT),
    **dict.fromkeys(["gpt-4o", "llama4"], _GPT4O_SPLIT),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def generate_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a token into two tokens, best score first."""
    merges: list[tuple[str, str, float]] = []
    long_tokens = 0
    for token, score in scores.items():
        if len(token) > MAX_MERGE_TOKEN:
            long_tokens += 1
            continue
        local = [
            (token[:i], token[i:], score)
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    if long_tokens:
        logger.warning("%d tokens longer than %d characters get no merges", long_tokens, MAX_MERGE_TOKEN)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _added(index: int, content: str, special: bool) -> dict[str, Any]:
    return {
        "id": index,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def _template(bos: str | None, bos_id: int | None, eos: str | None, eos_id: int | None) -> dict[str, Any]:
    def seq(name: str, type_id: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if bos is not None:
            out.append({"SpecialToken": {"id": bos, "type_id": type_id}})
        out.append({"Sequence": {"id": name, "type_id": type_id}})
        if eos is not None:
            out.append({"SpecialToken": {"id": eos, "type_id": type_id}})
        return out

    specials = {}
    for token, index in ((bos, bos_id), (eos, eos_id)):
        if token is not None:
            specials[token] = {"id": token, "ids": [index], "tokens": [token]}
    return {
        "type": "TemplateProcessing",
        "single": seq("A", 0),
        "pair": seq("A", 0) + seq("B", 1),
        "special_tokens": specials,
    }


def _bpe(
    vocab: dict[str, int], merges: list[tuple[str, str]], sentencepiece: bool, unk: str | None
) -> dict[str, Any]:
    return {
        "type": "BPE",
        "dropout": None,
        "unk_token": unk if sentencepiece else None,
        "continuing_subword_prefix": None if sentencepiece else "",
        "end_of_word_suffix": None if sentencepiece else "",
        "fuse_unk": sentencepiece,
        "byte_fallback": sentencepiece,
        "ignore_merges": False,
        "vocab": vocab,
        "merges": [list(m) for m in merges],
    }


def build_tokenizer(meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tokenizer.json, tokenizer_config.json) for the GGUF metadata `meta`."""
    kind = meta.get("tokenizer.ggml.model")
    arch = str(meta.get("general.architecture", ""))
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    original = list(tokens)
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [])
    gemma = kind == "llama" and arch.startswith("gemma")
    if kind == "gpt2":
        spelling = bytes_to_unicode()
        alphabet = set(spelling.values())
        vocab_tokens = [
            t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens
        ]
        vocab = {t: i for i, t in enumerate(vocab_tokens)}
        merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges") or []]
        controls = [
            (i, t)
            for i, (t, ty) in enumerate(zip(tokens, types, strict=False))
            if ty == _CONTROL and set(t) <= alphabet
        ]
    elif kind == "llama":
        if gemma:
            tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        vocab = {t: i for i, t in enumerate(tokens)}
        if meta.get("tokenizer.ggml.merges"):
            merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
        elif gemma:
            merges = generate_merges(vocab, {t: -i for i, t in enumerate(tokens)})
        else:
            merges = generate_merges(vocab, dict(zip(tokens, meta["tokenizer.ggml.scores"], strict=True)))
        controls = [(i, t) for i, (t, ty) in enumerate(zip(tokens, types, strict=False)) if ty == _CONTROL]
    else:
        raise ValueError(f"cannot rebuild a tokenizer of GGUF type {kind!r}; supported: 'gpt2', 'llama'")

    def special(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    bos, eos, unk, pad = (
        special(k) for k in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")
    )
    added = {i: _added(i, t, True) for i, t in controls}
    for i, (t, ty) in enumerate(
        zip(original, types, strict=False)
    ):  # as spelled in the file, like transformers
        if ty == _USER_DEFINED and t in vocab and i not in added:
            added[i] = _added(vocab[t], t, False)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
    }
    named = {"bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": pad}
    if gemma and "<mask>" in vocab:
        named["mask_token"] = "<mask>"
    for name, token in named.items():
        if token is not None:
            config[name] = token
            if token in vocab:
                added.setdefault(vocab[token], _added(vocab[token], token, True))
    config["add_bos_token"], config["add_eos_token"] = add_bos, add_eos
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    post = _template(
        bos if add_bos else None,
        vocab.get(bos or "") if add_bos else None,
        eos if add_eos else None,
        vocab.get(eos or ""),
    )
    tokenizer: dict[str, Any] = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added[i] for i in sorted(added)],
    }
    if kind == "gpt2":
        split = PRE_TOKENIZER_SPLITS.get(str(meta.get("tokenizer.ggml.pre")))
        byte_level = {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": split is None,
        }
        tokenizer["normalizer"] = None
        tokenizer["pre_tokenizer"] = (
            byte_level
            if split is None
            else {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False},
                    byte_level,
                ],
            }
        )
        tokenizer["post_processor"] = post
        tokenizer["decoder"] = {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        }
    elif gemma:
        tokenizer["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
        tokenizer["pre_tokenizer"] = {
            "type": "Split",
            "pattern": {"String": " "},
            "behavior": "MergedWithPrevious",
            "invert": False,
        }
        tokenizer["post_processor"] = post
        tokenizer["decoder"] = {"type": "Sequence", "decoders": _sentencepiece_decoders()}
    else:
        tokenizer["normalizer"] = None
        tokenizer["pre_tokenizer"] = {
            "type": "Metaspace",
            "replacement": "\u2581",
            "prepend_scheme": "first",
            "split": False,
        }
        tokenizer["post_processor"] = post
        strip = {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        tokenizer["decoder"] = {"type": "Sequence", "decoders": [*_sentencepiece_decoders(), strip]}
    tokenizer["model"] = _bpe(vocab, merges, kind == "llama", unk if kind == "llama" else None)
    return tokenizer, config


def _sentencepiece_decoders() -> list[dict[str, Any]]:
    return [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]


def tokenizer_files(meta: dict[str, Any], path: Path) -> dict[str, bytes]:
    """The tokenizer files of a GGUF (empty, with a log line, when it carries no tokenizer)."""
    if "tokenizer.ggml.tokens" not in meta:
        logger.warning("%s: no tokenizer in the GGUF metadata", path)
        return {}
    check_tokenizer_metadata(meta, str(path))
    tokenizer, config = build_tokenizer(meta)
    out = {
        "tokenizer.json": json.dumps(tokenizer, ensure_ascii=False, indent=None).encode(),
        "tokenizer_config.json": (json.dumps(config, ensure_ascii=False, indent=1) + "\n").encode(),
    }
    generation = {
        k: meta[f"tokenizer.ggml.{m}"]
        for k, m in (
            ("bos_token_id", "bos_token_id"),
            ("eos_token_id", "eos_token_id"),
            ("pad_token_id", "padding_token_id"),
        )
        if f"tokenizer.ggml.{m}" in meta
    }
    if generation:
        out["generation_config.json"] = (json.dumps(generation, indent=1) + "\n").encode()
    return out


_LISTS: dict[str, type | tuple[type, ...]] = {
    "tokens": str,
    "merges": str,
    "scores": (int, float),
    "token_type": int,
}
_IDS = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")


def check_tokenizer_metadata(meta: dict[str, Any], where: str) -> None:
    """The types and lengths `build_tokenizer` relies on; `GGUFError` naming `where` and the key."""

    def bad(key: str, why: str) -> GGUFError:
        return GGUFError(f"{where}: GGUF metadata 'tokenizer.ggml.{key}': {why}")

    if meta.get("tokenizer.ggml.model") not in ("gpt2", "llama"):
        raise bad("model", f"{meta.get('tokenizer.ggml.model')!r:.60}; supported: 'gpt2', 'llama'")
    for key, kind in _LISTS.items():
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is None and key != "tokens":
            continue
        if not isinstance(value, list) or not all(
            isinstance(v, kind) and not isinstance(v, bool) for v in value
        ):
            raise bad(key, f"expected a list of {getattr(kind, '__name__', 'numbers')}")
    tokens = meta["tokenizer.ggml.tokens"]
    if not tokens:
        raise bad("tokens", "empty vocabulary")
    for key in ("scores", "token_type"):
        if key in _present(meta) and len(meta[f"tokenizer.ggml.{key}"]) != len(tokens):
            raise bad(key, f"{len(meta[f'tokenizer.ggml.{key}'])} entries for {len(tokens)} tokens")
    gemma = str(meta.get("general.architecture", "")).startswith("gemma")
    if meta["tokenizer.ggml.model"] == "llama" and not _present(meta) & {"merges", "scores"} and not gemma:
        raise bad("scores", "missing: a sentencepiece vocabulary without merges needs its scores")
    if any(len(m.split(" ")) != 2 for m in meta.get("tokenizer.ggml.merges") or []):
        raise bad("merges", "every merge must be two tokens separated by one space")
    for key in _IDS:
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise bad(key, f"expected a token id, got {value!r:.60}")


def _present(meta: dict[str, Any]) -> set[str]:
    return {key for key in _LISTS if meta.get(f"tokenizer.ggml.{key}") is not None}
