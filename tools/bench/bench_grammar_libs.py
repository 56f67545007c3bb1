"""The constrained-decoding libraries side by side on SmolLM2's tokenizer (49,152 tokens): llguidance (what
llm_sampler[structured] uses) and xgrammar, when installed. For a JSON schema and a regex: the time to
compile the grammar, and the time per decode step to fill the next-token bitmask and accept the token,
walking the tokens of one valid output; each of those tokens must be allowed by both masks (correctness),
and the masks must agree on how many tokens they allow.

    python tools/bench/bench_grammar_libs.py      # JSON in tools/bench/results/grammar_libs.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import fixtures  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"]},
    },
    "required": ["name", "age", "tags", "address"],
}  # fmt: skip
JSON_TEXT = '{"name":"Ada Lovelace","age":36,"tags":["red","blue"],"address":{"city":"London","zip":"W1"}}'
REGEX = "[0-9]{4}-[0-9]{2}-[0-9]{2} [a-z]+( [a-z]+)*"
REGEX_TEXT = "2024-05-17 the quick brown fox jumps over the lazy dog"
CASES = {"json_schema": (SCHEMA, JSON_TEXT), "regex": (REGEX, REGEX_TEXT)}


def popcount(bitmask: torch.Tensor, vocab: int) -> int:
    bits = (bitmask[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return int(bits.reshape(-1)[:vocab].sum())


def allowed(bitmask: torch.Tensor, token: int) -> bool:
    return bool((int(bitmask[0, token // 32]) >> (token % 32)) & 1)


def walk(
    fill: Callable[[], object],
    accept: Callable[[int], object],
    mask: torch.Tensor,
    tokens: list[int],
    vocab: int,
) -> dict[str, Any]:
    """Fill the mask, check the next valid token is allowed, accept it: per-step times and allowed counts."""
    steps, counts, ok = [], [], True
    for t in tokens:
        t0 = time.perf_counter()
        fill()
        ok &= allowed(mask, t)
        accept(t)
        steps.append(time.perf_counter() - t0)
        counts.append(popcount(mask, vocab))
    return {"step_ms": steps, "allowed_counts": counts, "valid_text_allowed": ok}


def run_llguidance(tok: Any, kind: str, spec: Any, tokens: list[int]) -> dict[str, Any]:
    import llguidance
    import llguidance.torch

    from llm_sampler import structured

    lltok = structured.lltokenizer(tok)
    t0 = time.perf_counter()
    if kind == "json_schema":
        grammar = llguidance.LLMatcher.grammar_from_json_schema(spec, defaults={"whitespace_flexible": False})
    else:
        grammar = llguidance.LLMatcher.grammar_from_regex(spec)
    m = llguidance.LLMatcher(lltok, grammar, log_level=0)
    compile_s = time.perf_counter() - t0
    mask = llguidance.torch.allocate_token_bitmask(1, lltok.vocab_size)
    fill = lambda: llguidance.torch.fill_next_token_bitmask(m, mask, 0)  # noqa: E731
    return {"compile_ms": compile_s * 1e3, **walk(fill, m.consume_token, mask, tokens, len(tok))}


def run_xgrammar(tok: Any, kind: str, spec: Any, tokens: list[int]) -> dict[str, Any]:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    t0 = time.perf_counter()
    if kind == "json_schema":
        compiled = compiler.compile_json_schema(
            json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":")
        )
    else:
        compiled = compiler.compile_regex(spec)
    m = xgr.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - t0
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    fill = lambda: m.fill_next_token_bitmask(mask)  # noqa: E731
    return {"compile_ms": compile_s * 1e3, **walk(fill, m.accept_token, mask, tokens, len(tok))}


def main() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fixtures.real_checkpoint("smollm2"))
    libs = {"llguidance": run_llguidance}
    try:
        import xgrammar  # noqa: F401

        libs["xgrammar"] = run_xgrammar
    except ImportError:
        print("xgrammar is not installed: llguidance only")
    report: dict[str, Any] = {}
    print(
        f"{'case':12s} {'library':11s} {'compile ms':>11s} {'median step ms':>15s} {'max step ms':>12s}  valid"
    )
    for kind, (spec, text) in CASES.items():
        tokens = tok.encode(text, add_special_tokens=False)
        for name, fn in libs.items():
            fn(tok, kind, spec, tokens)  # warm-up (tokenizer tables, caches)
            r = fn(tok, kind, spec, tokens)
            r["step_ms"] = [s * 1e3 for s in r["step_ms"]]
            report[f"{kind}/{name}"] = r
            print(
                f"{kind:12s} {name:11s} {r['compile_ms']:11.2f} {statistics.median(r['step_ms']):15.3f} "
                f"{max(r['step_ms']):12.3f}  {r['valid_text_allowed']}"
            )
        if len(libs) == 2:
            a, b = (report[f"{kind}/{n}"]["allowed_counts"] for n in libs)
            report[f"{kind}/same_allowed_counts"] = sum(x == y for x, y in zip(a, b, strict=True)) / len(a)
            print(
                f"{kind:12s} steps where both allow the same number of tokens: {report[f'{kind}/same_allowed_counts']:.0%}"
            )
    out = HERE / "results" / "grammar_libs.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
