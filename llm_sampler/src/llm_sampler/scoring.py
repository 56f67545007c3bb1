"""Closed-form scoring: log-likelihoods of continuations after a context, for any forward_func.

Three engines, chosen by what the forward_func offers:
- stateless: every (context, option) is one row `(context + option)[:-1]`, rows sorted by length and batched
  with right padding (a causal model needs no mask for that). A row that is a prefix of another row is not
  computed twice (all the one-token options of a question share one row).
- incremental: the contexts of a batch of questions go in once (left-padded); then each option slot continues
  from the cache and is rewound, so a context is never recomputed per option.
- packed: with `forward_packed`, whole questions go in together as one prefix tree: contexts sorted, so
  that a prefix they share (the instructions, the few-shot examples) is computed once for all of them, each
  option after its own context. One call per pack of `pack_tokens` tokens: with a streamed model (weights
  read from disk layer by layer), one read of each layer serves every question of the pack.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llm_sampler.forward import ForwardFunc, all_logits, is_incremental

logger = logging.getLogger(__name__)

DEFAULT_BATCH_TOKENS = 2048
PACKED_TOKENS = 512  # dense attention over a pack grows with its square: keep packs short
Ids = tuple[int, ...]


@dataclass
class TokenScores:
    logprobs: list[float]
    is_greedy: bool


def _check_ids(ids: Any, what: str) -> Ids:
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(f"{what} must be a 1-D sequence of token ids, got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    out = tuple(int(t) for t in ids)
    if any(t < 0 for t in out):
        raise ValueError(f"{what} holds negative token ids")
    return out


def _score_rows(
    logits: torch.Tensor, rows: list[int], positions: list[int], targets: list[int]
) -> tuple[list[float], list[bool]]:
    """log-softmax only where needed: logits[rows, positions] -> (logprob of target, target is the argmax)."""
    picked = logits[torch.tensor(rows), torch.tensor(positions)].float().log_softmax(-1)  # (n, V)
    target = torch.tensor(targets, device=picked.device)
    if int(target.max()) >= picked.shape[-1]:
        raise ValueError(
            f"token id {int(target.max())} is outside the model's vocabulary of {picked.shape[-1]}"
        )
    lp = picked.gather(1, target[:, None])[:, 0]
    if bool(lp.isnan().any()):
        raise ValueError("forward_func returned NaN logits for a scored position")
    greedy = picked.argmax(-1) == target
    return lp.tolist(), greedy.tolist()


CALL_COST_TOKENS = 64  # the fixed cost of one forward call (reading the weights), in tokens' worth of compute


def _batches(lengths: list[int], batch_size: int | None, batch_tokens: int) -> list[list[int]]:
    """Indices sorted by length (longest first), cut into batches of at most `batch_size` rows (or, when
    None, at most `batch_tokens` padded tokens) so that padded tokens plus a fixed cost per call are fewest
    (dynamic programming over the sorted lengths: padding to a long row wastes more than an extra call)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    sizes = [max(1, lengths[i]) for i in order]
    n = len(order)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, max(-1, j - 1 - 512), -1):
            rows = j - i
            if (batch_size is not None and rows > batch_size) or (
                batch_size is None and rows > 1 and rows * sizes[i] > batch_tokens
            ):
                break
            cost = best[i] + CALL_COST_TOKENS + rows * sizes[i]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out: list[list[int]] = []
    j = n
    while j > 0:
        out.append(order[cut[j] : j])
        j = cut[j]
    return out[::-1]


def score_stateless(
    f: ForwardFunc,
    requests: Sequence[tuple[Ids, Ids]],
    batch_size: int | None,
    max_length: int | None,
    pad_id: int = 0,
) -> list[TokenScores]:
    results: list[TokenScores | None] = [None] * len(requests)
    inputs: list[Ids] = []
    owner: list[int] = []
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            results[i] = TokenScores([], True)
            continue
        full = ctx + cont
        if max_length is not None:
            full = full[-(max_length + 1) :]
        inputs.append(full[:-1])
        owner.append(i)
    # one row per input that is no prefix of another: sorted lexicographically, a prefix sits right before
    # the rows that extend it, so carrier[i] is the longest input input[i] is a prefix of
    uniq = sorted(set(inputs))
    carrier = list(range(len(uniq)))
    for j in range(len(uniq) - 2, -1, -1):
        if uniq[j + 1][: len(uniq[j])] == uniq[j]:
            carrier[j] = carrier[j + 1]
    where = {u: carrier[j] for j, u in enumerate(uniq)}
    rows = sorted(set(carrier))
    by_row: dict[int, list[int]] = {r: [] for r in rows}
    for k, inp in enumerate(inputs):
        by_row[where[inp]].append(k)
    for batch in _batches([len(uniq[r]) for r in rows], batch_size, DEFAULT_BATCH_TOKENS):
        width = len(uniq[rows[batch[0]]])
        x = torch.full((len(batch), width), pad_id, dtype=torch.long)
        for b, r in enumerate(batch):
            x[b, : len(uniq[rows[r]])] = torch.tensor(uniq[rows[r]])
        logits = all_logits(f(x), len(batch), width)
        flat_rows: list[int] = []
        flat_pos: list[int] = []
        flat_tgt: list[int] = []
        spans: list[tuple[int, int, int]] = []
        for b, r in enumerate(batch):
            for k in by_row[rows[r]]:
                ctx, cont = requests[owner[k]]
                n_in, n_cont = len(inputs[k]), len(cont)
                if n_cont > n_in:
                    raise ValueError(f"an option of {n_cont} tokens does not fit max_length={max_length}")
                spans.append((owner[k], len(flat_tgt), n_cont))
                flat_rows += [b] * n_cont
                flat_pos += range(n_in - n_cont, n_in)
                flat_tgt += cont
        lps, greedy = _score_rows(logits, flat_rows, flat_pos, flat_tgt)
        for i, start, n in spans:
            results[i] = TokenScores(lps[start : start + n], all(greedy[start : start + n]))
    return [r for r in results if r is not None]


def _group_by_context(requests: Sequence[tuple[Ids, Ids]]) -> dict[Ids, list[int]]:
    groups: dict[Ids, list[int]] = {}
    for i, (ctx, _) in enumerate(requests):
        groups.setdefault(ctx, []).append(i)
    return groups


class _Progress:
    """Questions done, with questions/s and an ETA: a tqdm bar when tqdm is installed, log lines otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar: Any = None
        self.total, self.done, self.enabled = total, 0, enabled
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            logger.info("scoring %d questions (install tqdm for a progress bar)", total)
            import time

            self._t0 = time.perf_counter()
            return
        self.bar = tqdm(total=total, unit="q", desc="scoring", dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled:
            import time

            dt = time.perf_counter() - self._t0
            rate = self.done / dt if dt > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            logger.info("scored %d/%d questions, %.2f q/s, ETA %.0f s", self.done, self.total, rate, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def score_incremental(
    f: Any,
    requests: Sequence[tuple[Ids, Ids]],
    batch_size: int | None,
    max_length: int | None,
    pad_id: int = 0,
    *,
    pack_tokens: int | None = None,
    progress: bool = False,
) -> list[TokenScores]:
    """Contexts once per batch of questions (left-padded), then option slot by slot from the cache."""
    results: list[TokenScores | None] = [None] * len(requests)
    groups = [(ctx, idx) for ctx, idx in _group_by_context(requests).items()]
    fits = [
        max(len(ctx) + len(requests[i][1]) for i in idx) <= (max_length or 1 << 62) + 1 for ctx, idx in groups
    ]
    if not all(
        fits
    ):  # lm-eval's left truncation changes the context per option: score those rows statelessly
        long = [i for (ctx, idx), ok in zip(groups, fits, strict=True) if not ok for i in idx]
        for i, r in zip(long, _score_via_reset(f, [requests[i] for i in long], max_length), strict=True):
            results[i] = r
        groups = [g for g, ok in zip(groups, fits, strict=True) if ok]
    if hasattr(f, "forward_packed"):  # one call per pack of questions, no padding, each context once
        batches = _pack_shared(groups, requests, pack_tokens or PACKED_TOKENS)
        run = _packed_questions
    else:  # contexts once (left-padded), then option slots continued from the cache and rewound
        batches = _batches([len(ctx) for ctx, _ in groups], batch_size, DEFAULT_BATCH_TOKENS)
        run = _incremental_batch
    bar = _Progress(len(groups), progress)
    try:
        for batch in batches:
            for i, r in run(f, [groups[g] for g in batch], requests, pad_id).items():
                results[i] = r
            bar.update(len(batch))
    finally:
        bar.close()
    return [r for r in results if r is not None]


def _common(a: Ids, b: Ids) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _pack_shared(
    groups: list[tuple[Ids, list[int]]], requests: Sequence[tuple[Ids, Ids]], budget: int
) -> list[list[int]]:
    """Group indices in context order cut into packs of at most `budget` packed tokens (a larger question
    goes alone); a context counts only the tokens it does not share with the one before it."""
    order = sorted(range(len(groups)), key=lambda g: groups[g][0])
    out: list[list[int]] = []
    total = budget + 1
    prev: Ids = ()
    for g in order:
        ctx, idx = groups[g]
        options = sum(max(0, len(requests[i][1]) - 1) for i in idx)
        size = len(ctx) - _common(prev, ctx) + options
        if total + size > budget:
            out.append([])
            total, size = 0, len(ctx) + options
        out[-1].append(g)
        total += size
        prev = ctx
    return out


def _score_via_reset(
    f: Any, requests: Sequence[tuple[Ids, Ids]], max_length: int | None
) -> list[TokenScores]:
    def stateless(x: torch.Tensor) -> torch.Tensor:
        f.reset()
        return f(x)

    return [score_stateless(stateless, [r], 1, max_length)[0] for r in requests]


def _right_padded(rows: list[Ids], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            x[b, : len(r)] = torch.tensor(r)
            mask[b, : len(r)] = 1
    return x, mask


def _incremental_batch(
    f: Any, chunk: list[tuple[Ids, list[int]]], requests: Sequence[tuple[Ids, Ids]], pad_id: int
) -> dict[int, TokenScores]:
    """Left-padded contexts followed by the first option of each question (right-padded) in one call, then
    one call per further option slot, each rewound after. Padding is masked, so rows never see it."""
    q = len(chunk)
    width = max(len(ctx) for ctx, _ in chunk)
    x = torch.full((q, width), pad_id, dtype=torch.long)
    mask = torch.zeros((q, width), dtype=torch.long)
    for b, (ctx, _) in enumerate(chunk):
        x[b, width - len(ctx) :] = torch.tensor(ctx)
        mask[b, width - len(ctx) :] = 1
    conts: dict[int, Ids] = {i: requests[i][1] for _, idx in chunk for i in idx}
    res = {i: TokenScores([], True) for i in conts}
    first = [(b, i) for b, (_, idx) in enumerate(chunk) for i in idx if conts[i]]
    # only options of 2+ tokens need a slot; longest first, so that the slots' widths line up across questions
    multi = [sorted((i for i in idx if len(conts[i]) > 1), key=lambda i: -len(conts[i])) for _, idx in chunk]
    f.reset()
    for slot in range(max(1, *(len(m) for m in multi))):
        owners = [m[slot] if slot < len(m) else -1 for m in multi]
        tails = [conts[i][:-1] if i >= 0 else () for i in owners]
        n = max(len(t) for t in tails)
        if slot > 0 and n == 0:
            continue
        y, ymask = _right_padded(tails, pad_id) if n else (x[:, :0], mask[:, :0])
        full_mask = torch.cat([mask, ymask], 1)
        new = torch.cat([x, y], 1) if slot == 0 else y
        out = f(new, attention_mask=full_mask) if not bool(full_mask.all()) else f(new)
        out = all_logits(out, q, new.shape[1], "the incremental forward_func")
        offset = width if slot == 0 else 0
        rows: list[int] = []
        pos: list[int] = []
        tgt: list[int] = []
        spans: list[tuple[int, int, int]] = []
        if slot == 0:  # every option's first token, predicted by its context's last position
            for b, i in first:
                spans.append((i, len(tgt), 1))
                rows.append(b)
                pos.append(width - 1)
                tgt.append(conts[i][0])
        for b, (i, t) in enumerate(zip(owners, tails, strict=True)):
            if t:
                spans.append((i, len(tgt), len(t)))
                rows += [b] * len(t)
                pos += range(offset, offset + len(t))
                tgt += conts[i][1:]
        if tgt:
            lps, greedy = _score_rows(out, rows, pos, tgt)
            for i, start, k in spans:
                r = res[i]
                res[i] = TokenScores(
                    r.logprobs + lps[start : start + k], r.is_greedy and all(greedy[start : start + k])
                )
        if n:
            f.rewind(n)
    return res


def _packed_questions(
    f: Any, chunk: list[tuple[Ids, list[int]]], requests: Sequence[tuple[Ids, Ids]], pad_id: int
) -> dict[int, TokenScores]:
    """Whole questions packed in one row after `reset()` (an empty cache), as one prefix tree: contexts in
    sorted order, each adding only the tokens it does not share with the one before it (a shared prefix
    is computed once), then every option's tokens but the last, each attending to its own context and to
    itself."""
    ids: list[int] = []
    pos: list[int] = []
    # (start, length, the spans (start, length) of ids it also attends to)
    blocks: list[tuple[int, int, list[tuple[int, int]]]] = []
    flat_pos: list[int] = []
    tgt: list[int] = []
    spans: list[tuple[int, int, int]] = []
    prev: Ids = ()
    prev_path: list[tuple[int, int]] = []
    for ctx, idx in sorted(chunk, key=lambda g: g[0]):
        shared = _common(prev, ctx)
        path: list[tuple[int, int]] = []  # where ctx's tokens are, in order
        need = shared
        for start, length in prev_path:
            if need == 0:
                break
            path.append((start, min(length, need)))
            need -= path[-1][1]
        if shared < len(ctx):
            t0 = len(ids)
            ids += ctx[shared:]
            pos += range(shared, len(ctx))
            blocks.append((t0, len(ctx) - shared, list(path)))
            path.append((t0, len(ctx) - shared))
        last = path[-1][0] + path[-1][1] - 1  # the position that predicts each option's first token
        for i in idx:
            cont = requests[i][1]
            if not cont:
                continue
            t0 = len(ids)
            ids += cont[:-1]
            pos += range(len(ctx), len(ctx) + len(cont) - 1)
            blocks.append((t0, len(cont) - 1, path))
            spans.append((i, len(tgt), len(cont)))
            flat_pos += [last, *range(t0, t0 + len(cont) - 1)]
            tgt += cont
        prev, prev_path = ctx, path
    n = len(ids)
    tree = torch.zeros((1, n, n), dtype=torch.bool)
    for start, length, attends in blocks:
        for s0, s_len in attends:
            tree[0, start : start + length, s0 : s0 + s_len] = True
        tree[0, start : start + length, start : start + length] = torch.tril(
            torch.ones(length, length, dtype=torch.bool)
        )
    f.reset()
    logits = f.forward_packed(torch.tensor([ids]), torch.tensor([pos]), tree)
    logits = all_logits(logits, 1, n, "forward_packed")
    res = {i: TokenScores([], True) for _, idx in chunk for i in idx}
    if tgt:
        lps, greedy = _score_rows(logits, [0] * len(tgt), flat_pos, tgt)
        for i, start, k in spans:
            res[i] = TokenScores(lps[start : start + k], all(greedy[start : start + k]))
    return res


def score_requests(
    forward_func: ForwardFunc,
    requests: Sequence[tuple[Ids, Ids]],
    *,
    batch_size: int | None = None,
    max_length: int | None = None,
    use_cache: bool | None = None,
    pack_tokens: int | None = None,
    progress: bool = False,
) -> list[TokenScores]:
    """Token log-probabilities of each `(context_ids, continuation_ids)`; the engine depends on the forward_func.

    `pack_tokens`: tokens per `forward_packed` call (default 512); size it from the activation memory you
    can spare: a streamed model reads its weights once per call. `progress`: a bar (tqdm) over questions."""
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None (automatic) or an int >= 1, got {batch_size!r}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be None or an int >= 1, got {max_length!r}")
    for ctx, _ in requests:
        if not ctx:
            raise ValueError(
                "a context is empty: give at least one token (score_texts uses the BOS/prefix token)"
            )
    incremental = is_incremental(forward_func) if use_cache is None else use_cache
    if incremental and not is_incremental(forward_func):
        raise ValueError("use_cache=True needs an incremental forward_func (with reset() and rewind())")
    if pack_tokens is not None and (not isinstance(pack_tokens, int) or pack_tokens < 1):
        raise ValueError(f"pack_tokens must be None or an int >= 1, got {pack_tokens!r}")
    if incremental:
        return score_incremental(
            forward_func, requests, batch_size, max_length, pack_tokens=pack_tokens, progress=progress
        )
    if is_incremental(forward_func):
        return _score_via_reset(forward_func, requests, max_length)
    return score_stateless(forward_func, requests, batch_size, max_length)
