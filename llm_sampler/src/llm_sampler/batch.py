"""Per-row sampling: every row of a batch follows its own `SamplingConfig` (continuous batching).

A `SamplingRow` holds one sequence's parameters and state: its tokens so far, its prompt length, its seed and
step (llm_sampler.rng: noise depends on (seed, step, token id) only), its `TokenSelector` (mirostat's mu lives
there), its structured-output `Constraint` and its stop rules. `sample_rows(rows, logits)` chooses the next
token of each row from a (B, V) logits tensor. Rows whose configs are equal and whose processors need no
token ids (temperature, top-k/p, min-p, XTC, ...) are sampled as one group through one selector, once per
group; rows with penalties, DRY, mirostat or n-gram bans (which read the row's own tokens, or keep state)
run alone. A row with seed s draws the tokens `generate(..., seed=s)` draws for it alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from llm_sampler import chain as C
from llm_sampler import samplers as S
from llm_sampler import structured
from llm_sampler.config import SamplingConfig
from llm_sampler.generate import StopChecker
from llm_sampler.select import TokenSelector

# fields that do not change how the selector turns logits into a token
_NOT_SELECTION = frozenset(
    {
        "seed",
        "decode",
        "tokenizer",
        "json_schema",
        "regex",
        "choices",
        "grammar",
        "max_time",
        "num_return_sequences",
        "stop_strings",
        "stop_sequences",
        "eos_token_id",
        "pad_token_id",
        "return_logprobs",
    }
)


@dataclass
class RowToken:
    """One row's step: `token`, whether the row is `finished` and why (`"stop"`: eos, a stop sequence or
    string, or its constraint completed; `"length"`: max_new_tokens), and when asked for, the model's
    log-probability of the token and its `top` alternatives [(token id, log-probability)]."""

    token: int
    finished: bool
    finish_reason: str | None
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


class SamplingRow:
    """One sequence being generated. `config` as `SamplingConfig.from_kwargs` builds it (its `seed` is this
    row's seed: `generate`'s seed + j for its j-th return sequence); `prompt` the row's token ids;
    `top_logprobs`: None (no log-probabilities), 0 (the chosen token's) or k (and the k most likely)."""

    def __init__(
        self,
        config: SamplingConfig,
        prompt: Sequence[int],
        max_new_tokens: int,
        *,
        top_logprobs: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if not prompt:
            raise ValueError("prompt must hold at least one token")
        self.config = config
        self.ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)  # (1, T)
        self.prompt_len = len(prompt)
        self.max_new_tokens = max_new_tokens
        self.top_logprobs = top_logprobs
        self.step = 0
        self.finished = max_new_tokens == 0
        seed = config.seed
        if seed is not None and not isinstance(seed, int):
            raise ValueError("a SamplingRow takes one int seed")
        self.seeds = None if seed is None else torch.tensor([seed - 2**64 if seed >= 2**63 else seed])
        self.selector = TokenSelector(config, self.prompt_len, self.seeds)
        self.stop = StopChecker(config, self.prompt_len, self.ids.device)
        self.constraint: structured.Constraint | None = None
        text = structured.grammar_text(config.json_schema, config.regex, config.choices, config.grammar)
        if text is not None:
            self.constraint = structured.Constraint(text[0], text[1], config.tokenizer, 1)
        self.group = None if _needs_own_selector(self.selector) else _selection_key(config)

    @property
    def generated(self) -> list[int]:
        return self.ids[0, self.prompt_len :].tolist()

    def prepare(self) -> None:
        """Start the constraint's next mask (call before the forward pass, so the two overlap)."""
        if self.constraint is not None and not self.finished:
            self.constraint.start()

    def close(self) -> None:
        """Release the constraint's worker thread (a row that finished or was cancelled)."""
        if self.constraint is not None:
            self.constraint.close()
            self.constraint = None

    def _advance(self, token: int) -> tuple[bool, str | None]:
        t = torch.tensor([token], dtype=torch.long, device=self.ids.device)
        self.ids = torch.cat([self.ids, t[None]], 1)
        self.step += 1
        was = torch.zeros(1, dtype=torch.bool, device=self.ids.device)
        done = bool(self.stop(self.ids, t, was)[0])
        if self.constraint is not None and not done:
            done = bool(self.constraint.advance(t, was)[0])
        if done:
            self.finished = True
            return True, "stop"
        if self.step >= self.max_new_tokens:
            self.finished = True
            return True, "length"
        return False, None


def _needs_own_selector(sel: TokenSelector) -> bool:
    """Processors that read the row's tokens (or keep state across steps) cannot be shared by rows."""
    if sel.token_processors or sel.mirostat is not None:
        return True
    if sel.chain is not None and any(n in C.TOKEN_STEPS for n, _ in sel.chain.steps):
        return True
    return any(isinstance(w, S.DRY) for w in sel.warpers)


def _selection_key(config: SamplingConfig) -> tuple[Any, ...]:
    return tuple(
        (f.name, repr(getattr(config, f.name))) for f in fields(config) if f.name not in _NOT_SELECTION
    )


class RowError(ValueError):
    """A row cannot continue (NaN logits, every token filtered out): `row` is its index in the call."""

    def __init__(self, row: int, message: str) -> None:
        super().__init__(message)
        self.row = row


def sample_rows(rows: Sequence[SamplingRow], logits: torch.Tensor) -> list[RowToken]:
    """The next token of each row: `logits` (B, V), row i of it for `rows[i]`. Advances every row (its
    tokens, step, constraint) and says which finished. Raises `RowError` naming the first row that cannot
    continue; the other rows are then not advanced."""
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits must be (B, V) for {len(rows)} rows, got {tuple(logits.shape)}")
    logits = logits.float()
    scores = logits
    if any(r.constraint is not None for r in rows):
        scores = logits.clone()
        for i, r in enumerate(rows):
            if r.constraint is not None:
                scores[i : i + 1] = r.constraint.apply(logits[i : i + 1])
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, r in enumerate(rows):
        if r.group is None:
            key: tuple[Any, ...] = ("alone", i)
        else:  # seeded rows share a call only at the same step (the noise hashes (seed, step, token))
            key = (r.group, r.seeds is not None, r.step if r.seeds is not None else 0)
        groups.setdefault(key, []).append(i)
    tokens = torch.empty(len(rows), dtype=torch.long)
    for members in groups.values():
        first = rows[members[0]]
        sel = first.selector
        index = torch.tensor(members)
        if len(members) == 1:
            ids = first.ids
        else:  # the group's processors read no token ids
            ids = torch.zeros(len(members), 1, dtype=torch.long, device=first.ids.device)
            if first.seeds is not None:
                sel.seeds = torch.cat([rows[i].seeds for i in members])  # type: ignore[misc]
        try:
            out = sel(ids, scores.index_select(0, index.to(scores.device)), first.step)
        finally:
            sel.seeds = first.seeds
        bad = (out.bad_logits | out.nothing_left).tolist()
        for j, m in enumerate(members):
            if bad[j]:
                what = "NaN or +inf logits" if bool(out.bad_logits[j]) else "every token was filtered out"
                raise RowError(m, f"{what} at step {rows[m].step}")
        tokens[index] = out.tokens.to(tokens.device)
    result = []
    chosen = tokens.tolist()
    want = [i for i, r in enumerate(rows) if r.top_logprobs is not None]
    logprobs = logits[want].log_softmax(-1) if want else None
    for i, r in enumerate(rows):
        finished, reason = r._advance(chosen[i])
        step = RowToken(chosen[i], finished, reason)
        if logprobs is not None and r.top_logprobs is not None:
            lp = logprobs[want.index(i)]
            step.logprob = float(lp[chosen[i]])
            if r.top_logprobs:
                v, ix = lp.topk(r.top_logprobs)
                step.top = list(zip(ix.tolist(), v.tolist(), strict=True))
        result.append(step)
    return result
