"""Scores against a naive reference (one full forward per option) and against lm-evaluation-harness."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sampler_testlib import NaivePacked, stateless

import llm_sampler
from llm_sampler import IncrementalHF, score, score_many, score_texts


def naive_loglikelihood(model: Any, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """The reference: one forward of context + option, log-softmax, sum over the option's tokens."""
    with torch.no_grad():
        logp = model(torch.tensor([ctx + cont])).logits[0].float().log_softmax(-1)
    rows = logp[len(ctx) - 1 : len(ctx) - 1 + len(cont)]
    target = torch.tensor(cont)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def random_questions(seed: int, n: int, vocab: int = 256) -> list[tuple[list[int], list[list[int]]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ctx = torch.randint(3, vocab, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
        k = int(torch.randint(1, 6, (1,), generator=g))
        opts = [
            torch.randint(3, vocab, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
            for _ in range(k)
        ]
        out.append((ctx, opts))
    return out


def forward_funcs(model: Any) -> dict[str, Any]:
    return {
        "stateless": stateless(model),
        "IncrementalHF": IncrementalHF(model),
        "packed": NaivePacked(model),
    }


@pytest.mark.parametrize("kind", ["stateless", "IncrementalHF", "packed"])
@pytest.mark.parametrize("batch_size", [1, 3, None])
def test_score_matches_naive_tiny(tiny_llama: Any, kind: str, batch_size: int | None) -> None:
    f = forward_funcs(tiny_llama)[kind]
    for ctx, opts in random_questions(0, 4):
        scores = score(f, ctx, opts, batch_size=batch_size)
        for option, s in zip(opts, scores, strict=True):
            ref, greedy = naive_loglikelihood(tiny_llama, ctx, option)
            assert abs(s.loglikelihood - ref) < 1e-4
            assert s.is_greedy == greedy and s.num_tokens == len(option)
    if kind == "packed":  # one question at a time: its options went in as a packed prefix tree
        assert f.calls["packed"] > 0


class TinyTokenizer:
    """Characters are tokens (id = byte + 3), no special tokens: a stand-in for texts on a 256-token model."""

    bos_token_id = 1
    eos_token_id = 2

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [min(b + 3, 255) for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


@pytest.mark.parametrize("kind", ["stateless", "IncrementalHF", "packed"])
def test_score_many_batches_across_questions(tiny_llama: Any, kind: str) -> None:
    f = forward_funcs(tiny_llama)[kind]
    tok = TinyTokenizer()
    requests = [
        ("The cat sat on the ", ["mat", "hat", "chair by the door"]),
        ("Q: 2+2?\nA:", [" 4", " 5"]),
        ("", ["hello", "x"]),
        ("A much longer context that needs some padding in a batch.", [" yes", " no", " maybe", " y"]),
    ]
    for batch_size in (None, 2):
        results = score_many(f, tok, requests, batch_size=batch_size)
        for (context, options), scores in zip(requests, results, strict=True):
            for option, s in zip(options, scores, strict=True):
                ctx, cont = lm_eval_encode_pair(tok, context, option)
                ref, greedy = naive_loglikelihood(tiny_llama, ctx, cont)
                assert abs(s.loglikelihood - ref) < 1e-4 and s.is_greedy == greedy


def lm_eval_encode_pair(tok: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness 0.4.x's rules, re-implemented from its source (TemplateLM.loglikelihood and
    _encode_pair, HFLM.tok_encode with the default add_bos_token=None)."""
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if context == "":
        cont = tok.encode(continuation, add_special_tokens=False)
        return ([prefix], cont) if prefix != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return ctx, whole[len(ctx) :]


TEXT_REQUESTS = [
    ("The capital of France is ", ["Paris", "London", "the city of lights"]),
    ("Question: Which is a fruit?\nAnswer:", [" an apple", " a carrot"]),
    ("Emoji: ", ["🙂🙂", "日本語のテキスト", "naïve café"]),
    ("", ["Hello world", " Once upon a time"]),
]


@pytest.fixture(scope="module")
def smol_naive(smollm2: Any, smollm2_tokenizer: Any) -> list[list[tuple[float, bool]]]:
    return [
        [naive_loglikelihood(smollm2, *lm_eval_encode_pair(smollm2_tokenizer, c, o)) for o in opts]
        for c, opts in TEXT_REQUESTS
    ]


@pytest.mark.parametrize("kind", ["stateless", "IncrementalHF"])
def test_score_many_real_smollm2(smollm2: Any, smollm2_tokenizer: Any, smol_naive: Any, kind: str) -> None:
    f = stateless(smollm2) if kind == "stateless" else IncrementalHF(smollm2)
    for batch_size in (None, 3):
        results = score_many(f, smollm2_tokenizer, TEXT_REQUESTS, batch_size=batch_size)
        for scores, refs in zip(results, smol_naive, strict=True):
            for s, (ref, greedy) in zip(scores, refs, strict=True):
                assert abs(s.loglikelihood - ref) < 1e-4 and s.is_greedy == greedy


def test_tokenizers_tokenizer_same_as_hf(smollm2_path: Any, smollm2_tokenizer: Any) -> None:
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(smollm2_path / "tokenizer.json"))
    hf = llm_sampler.TextEncoder(smollm2_tokenizer)
    fast = llm_sampler.TextEncoder(raw, prefix_token_id=smollm2_tokenizer.bos_token_id)
    for context, options in TEXT_REQUESTS:
        for option in options:
            assert hf.pair(context, option) == fast.pair(context, option)
            ctx, cont = lm_eval_encode_pair(smollm2_tokenizer, context, option)
            assert hf.pair(context, option) == (tuple(ctx), tuple(cont))
    with pytest.raises(ValueError, match="prefix_token_id"):
        llm_sampler.TextEncoder(raw).pair("", "x")


def test_against_lm_eval_hflm(smollm2: Any, smollm2_tokenizer: Any) -> None:
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in tools/requirements-test.txt")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    assert lm_eval is not None
    lm = HFLM(pretrained=smollm2, tokenizer=smollm2_tokenizer, batch_size=4, device="cpu")
    reqs = [
        Instance("loglikelihood", {}, (c, o), i) for i, (c, opts) in enumerate(TEXT_REQUESTS) for o in opts
    ]
    theirs = lm.loglikelihood(reqs, disable_tqdm=True)
    ours = [
        (s.loglikelihood, s.is_greedy)
        for sc in score_many(IncrementalHF(smollm2), smollm2_tokenizer, TEXT_REQUESTS)
        for s in sc
    ]
    for (a, ga), (b, gb) in zip(theirs, ours, strict=True):
        assert abs(a - b) < 1e-4 and ga == gb


def test_normalizations(tiny_llama: Any) -> None:
    tok = TinyTokenizer()
    f = stateless(tiny_llama)
    options = ["ab", "abcdef", "é"]
    scores = score_texts(f, tok, "Pick one:", options, normalize="unconditional")
    for o, s in zip(options, scores, strict=True):
        ll = s.loglikelihood
        assert s.normalized("token") == pytest.approx(ll / s.num_tokens)
        assert s.normalized("char") == pytest.approx(ll / len(o))
        assert s.normalized("byte") == pytest.approx(ll / len(o.encode()))
        uncond = score_texts(f, tok, "", [o])[0].loglikelihood
        assert s.normalized("unconditional") == pytest.approx(ll - uncond, abs=1e-5)
    values = scores.normalized("char")
    assert scores.best("char") == values.index(max(values))
    assert scores.best() == scores.best("unconditional")


def test_degenerate_inputs(tiny_llama: Any) -> None:
    f = stateless(tiny_llama)
    s = score(f, [5, 6], [[], [7]])
    assert s[0].loglikelihood == 0.0 and s[0].is_greedy and s[0].normalized("token") == 0.0
    with pytest.raises(ValueError, match=r"context_ids is empty|a context is empty"):
        score(f, [], [[1]])
    with pytest.raises(ValueError, match="continuation_ids_list is empty"):
        score(f, [1], [])
    with pytest.raises(ValueError, match="does not fit max_length"):
        score(f, [1, 2, 3], [[4, 5, 6, 7, 8]], max_length=4)
    # longer than the window: cut from the left as lm-eval does
    s = score(f, list(range(3, 13)), [[20, 21]], max_length=6)
    ref, _ = naive_loglikelihood(tiny_llama, list(range(8, 13)), [20, 21])  # (ctx + cont)[-7:][:-1]
    assert abs(s[0].loglikelihood - ref) < 1e-4
    with pytest.raises(ValueError, match="NaN"):
        score(lambda x: torch.full((*x.shape, 8), float("nan")), [1], [[2]])
    with pytest.raises(ValueError, match=r"batch of|shape"):
        score(lambda x: torch.zeros(x.shape[0] + 1, x.shape[1], 8), [1], [[2], [3]])
    with pytest.raises(ValueError, match="every position"):
        score(lambda x: torch.zeros(x.shape[0], 8), [1], [[2]])
    with pytest.raises(ValueError, match="vocabulary"):
        score(lambda x: torch.zeros(*x.shape, 8), [1], [[20]])
    with pytest.raises(ValueError, match="normalize"):
        score_texts(f, TinyTokenizer(), "a", ["b"], normalize="per-token")
    with pytest.raises(ValueError, match="batch_size"):
        score(f, [1], [[2]], batch_size=0)
