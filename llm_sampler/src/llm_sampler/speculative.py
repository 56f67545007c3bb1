"""Speculative decoding (Leviathan et al. 2023, Chen et al. 2023) for one sequence, with a draft forward_func
or with prompt lookup (draft tokens copied from an earlier match of the last n-gram: no draft model).

Each round the draft proposes `num_draft_tokens` tokens, the target scores them all in one call, and
- greedy (`temperature=0`): the drafts are kept while they equal the target's argmax, then the target's
  own token is added: the output is exactly the target's greedy output;
- sampling: draft token x is kept with probability min(1, p(x) / q(x)); at the first rejection a token is
  drawn from normalize(max(0, p - q)); if all are kept, one more is drawn from p. The output is distributed
  as sampling from the target alone. p and q are the processed distributions (penalties, temperature, top-k,
  top-p ...) of target and draft at each position; a prompt-lookup draft is deterministic (q is one-hot).
Incremental forward_funcs are rewound by the rejected tokens; stateless ones get whole sequences.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from llm_sampler.config import SamplingConfig
from llm_sampler.forward import Caller, ForwardFunc, all_logits, as_batch, last_logits
from llm_sampler.generate import Generation, StopChecker
from llm_sampler.select import TokenSelector


def prompt_lookup(ids: list[int], num_tokens: int, max_ngram: int = 3) -> list[int]:
    """Tokens that followed the most recent earlier occurrence of the longest trailing n-gram."""
    for n in range(min(max_ngram, len(ids) - 1), 0, -1):
        tail = ids[-n:]
        for start in range(len(ids) - n - 1, -1, -1):
            if ids[start : start + n] == tail:
                return ids[start + n : start + n + num_tokens]
    return []


def _check_args(draft: Any, lookup: int | None, num_draft_tokens: int, max_ngram: int) -> None:
    if (draft is None) == (lookup is None):
        raise ValueError("give exactly one of draft_forward_func and prompt_lookup_num_tokens")
    if lookup is not None and (not isinstance(lookup, int) or lookup < 1):
        raise ValueError(f"prompt_lookup_num_tokens must be an int >= 1, got {lookup!r}")
    if not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be an int >= 1, got {num_draft_tokens!r}")
    if not isinstance(max_ngram, int) or max_ngram < 1:
        raise ValueError(f"max_matching_ngram_size must be an int >= 1, got {max_ngram!r}")


def speculative_sample(
    forward_func: ForwardFunc,
    input_ids: Any,
    max_new_tokens: int,
    *,
    draft_forward_func: ForwardFunc | None = None,
    prompt_lookup_num_tokens: int | None = None,
    num_draft_tokens: int = 4,
    max_matching_ngram_size: int = 3,
    **params: Any,
) -> Iterator[torch.Tensor]:
    """Yield the new tokens (LongTensor[1]) of one sequence as they are accepted. `params` as for `sample`
    (num_return_sequences must be 1; `seed` makes the run reproducible)."""
    _check_args(draft_forward_func, prompt_lookup_num_tokens, num_draft_tokens, max_matching_ngram_size)
    config = SamplingConfig.from_kwargs(params)
    if config.num_return_sequences != 1:
        raise ValueError("speculative decoding takes num_return_sequences=1")
    if config.mirostat or config.xtc_probability:
        name = "mirostat" if config.mirostat else "xtc_probability"
        raise ValueError(
            f"speculative decoding does not support {name}: its distribution changes per step "
            "(a random coin or a state), so draft tokens cannot be verified against it"
        )
    constraint = [k for k in ("json_schema", "regex", "choices", "grammar") if getattr(config, k) is not None]
    if constraint:
        raise ValueError(
            f"speculative decoding does not support {constraint[0]}=: a constraint's matcher consumes each "
            "token as it is chosen and cannot take back rejected drafts; use generate/sample"
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    ids, _ = as_batch(input_ids, None)
    if ids.shape[0] != 1:
        raise ValueError(f"speculative decoding runs one sequence at a time, got a batch of {ids.shape[0]}")
    gen = None
    if config.seed is not None:
        gen = torch.Generator(device=ids.device).manual_seed(
            int(config.seed if isinstance(config.seed, int) else config.seed[0])
        )
    return _run(
        forward_func,
        draft_forward_func,
        ids,
        config,
        max_new_tokens,
        gen,
        prompt_lookup_num_tokens or num_draft_tokens,
        max_matching_ngram_size,
        prompt_lookup_num_tokens is not None,
    )


def _probs(selector: TokenSelector, prefix: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    scores = selector.process(prefix, logits[None])[0]
    if bool(scores.isnan().any() or (scores == float("inf")).any()):
        raise ValueError("forward_func returned NaN or +inf logits")
    if bool((scores == float("-inf")).all()):
        raise ValueError("every token was filtered out (check bad_words_ids, logit_bias and the logits)")
    return scores.softmax(-1)


def _catch_up(caller: Caller, seen: list[int], seq: list[int]) -> None:
    """Rewind a forward_func to the longest prefix it saw that `seq` shares (always leaving at least one
    token of `seq` to send); a stateless one then returns the logits of the positions from there on."""
    common = 0
    for a, b in zip(seen[: caller.sent], seq, strict=False):
        if a != b:
            break
        common += 1
    common = min(common, len(seq) - 1)
    if caller.sent > common:
        caller.rewind(caller.sent - common)


def _run(
    target: ForwardFunc,
    draft: ForwardFunc | None,
    ids: torch.Tensor,
    config: SamplingConfig,
    max_new_tokens: int,
    gen: torch.Generator | None,
    gamma: int,
    max_ngram: int,
    lookup: bool,
) -> Iterator[torch.Tensor]:
    prompt_len = ids.shape[1]
    selector = TokenSelector(config, prompt_len)
    stop = StopChecker(config, prompt_len, ids.device)
    tcall, dcall = Caller(target), (Caller(draft) if draft is not None else None)
    tcall.reset()
    if dcall is not None:
        dcall.reset()
    greedy = config.greedy
    new = 0
    t_seen: list[int] = []
    d_seen: list[int] = []
    while new < max_new_tokens:
        k = min(gamma, max_new_tokens - new)
        drafts: list[int] = []
        q: list[torch.Tensor | None] = []
        if lookup:
            drafts = prompt_lookup(ids[0].tolist(), k, max_ngram)
            q = [None] * len(drafts)
        else:
            assert dcall is not None
            seq = ids
            for _ in range(k):
                _catch_up(dcall, d_seen, seq[0].tolist())
                qd = _probs(selector, seq, last_logits(dcall(seq, None), 1, "draft_forward_func")[0])
                d_seen = seq[0].tolist()
                tok = int(qd.argmax()) if greedy else int(torch.multinomial(qd, 1, generator=gen))
                drafts.append(tok)
                q.append(qd)
                seq = torch.cat([seq, torch.tensor([[tok]], device=ids.device)], 1)
        seq = (
            torch.cat([ids, torch.tensor([drafts], dtype=torch.long, device=ids.device)], 1)
            if drafts
            else ids
        )
        _catch_up(tcall, t_seen, seq[0].tolist())
        n_out = seq.shape[1] - tcall.sent
        out = tcall(seq, None)
        t_seen = seq[0].tolist()
        if n_out < len(drafts) + 1:
            raise AssertionError(
                "target cache out of step"
            )  # _catch_up leaves the drafts and one more to send
        logits = all_logits(out, 1, n_out, "forward_func")[0, -(len(drafts) + 1) :]
        accepted: list[int] = []
        for i in range(len(drafts) + 1):
            p = _probs(selector, seq[:, : ids.shape[1] + i], logits[i])
            if i == len(drafts):
                accepted.append(int(p.argmax()) if greedy else int(torch.multinomial(p, 1, generator=gen)))
                break
            d = drafts[i]
            if greedy:
                if int(p.argmax()) == d:
                    accepted.append(d)
                    continue
                accepted.append(int(p.argmax()))
                break
            qi = q[i]
            ratio = p[d] if qi is None else p[d] / qi[d]
            if float(torch.rand((), generator=gen, device=p.device)) < float(ratio):
                accepted.append(d)
                continue
            residual = p.clone() if qi is None else (p - qi).clamp_(min=0)
            if qi is None:
                residual[d] = 0
            if float(residual.sum()) <= 0:  # p == q: cannot happen after a rejection, except by rounding
                residual = p
            accepted.append(int(torch.multinomial(residual / residual.sum(), 1, generator=gen)))
            break
        finished = torch.zeros(1, dtype=torch.bool, device=ids.device)
        for tok in accepted:
            t = torch.tensor([tok], device=ids.device)
            ids = torch.cat([ids, t[None]], 1)
            new += 1
            yield t
            finished = stop(ids, t, finished)
            if bool(finished.all()) or new >= max_new_tokens:
                return


def speculative_generate(
    forward_func: ForwardFunc,
    input_ids: Any,
    max_new_tokens: int,
    **kwargs: Any,
) -> Generation:
    """`speculative_sample` run to the end: the prompt and its continuation, as `generate` returns them."""
    ids, _ = as_batch(input_ids, None)
    tokens = list(speculative_sample(forward_func, input_ids, max_new_tokens, **kwargs))
    seq = torch.cat([ids, torch.cat(tokens)[None]], 1) if tokens else ids
    return Generation(seq, None, ids.shape[1])
