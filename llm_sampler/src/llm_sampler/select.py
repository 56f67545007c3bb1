"""Choosing the next token of every row from its logits: processors, then greedy or sampling.

The fast path for large vocabularies: `topk(k)` once on the processed scores, then temperature and every
other warper on the k survivors only (they depend on the distribution, not on token ids, and tokens outside
the top k have probability 0 anyway), then a Gumbel-max draw on those k values: no full sort, no
`multinomial`, no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm_sampler import chain as C
from llm_sampler import processors as P
from llm_sampler import rng
from llm_sampler import samplers as S
from llm_sampler.config import SamplingConfig


@dataclass
class Selection:
    tokens: torch.Tensor  # (B,) chosen token ids
    logprobs: torch.Tensor | None  # (B,) log-probability of each chosen token under the final distribution
    bad_logits: torch.Tensor  # (B,) bool: the model returned NaN or +inf
    nothing_left: torch.Tensor  # (B,) bool: every token was filtered out


class TokenSelector:
    """`selector(input_ids, logits, step) -> Selection` for one decoding step of a batch."""

    def __init__(self, config: SamplingConfig, prompt_len: int, seeds: torch.Tensor | None = None) -> None:
        self.config = config
        names = C.resolve(config.samplers)
        self.chain = None if names is None else C.Chain(config, names, prompt_len)
        if self.chain is None:
            self.token_processors = config.token_processors(prompt_len) + config.llama_cpp_processors()
            self.warpers = config.warpers()
        else:  # the bans first, then the chain (llm_sampler.chain)
            self.token_processors = config.token_processors(prompt_len, penalties=False)
            self.warpers = self.chain.processors()
            if config.greedy:
                self.token_processors += self.chain.token_steps()
        self.seeds = seeds
        self.dynatemp = None
        if config.dynatemp_range > 0:
            self.dynatemp = S.DynamicTemperature(
                config.temperature, config.dynatemp_range, config.dynatemp_exponent
            )
        self.mirostat = (
            S.Mirostat(config.mirostat, config.mirostat_tau, config.mirostat_eta) if config.mirostat else None
        )

    def process(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary processed scores (token processors, temperature, top-k, warpers): for tests and
        for the speculative sampler, which needs whole distributions."""
        scores = P.apply(self.token_processors, input_ids, logits.float())
        if self.config.greedy:
            return scores
        vals, idx = self._warp(input_ids, scores)
        if idx is None:
            return vals
        return torch.full_like(scores, P.NEG_INF).scatter_(1, idx, vals)

    def _warp(
        self, input_ids: torch.Tensor, scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (values, token ids of the values or None for the whole vocabulary)."""
        cfg = self.config
        if self.chain is not None and self.mirostat is None:
            return self.chain(input_ids, scores)
        idx = None
        if cfg.top_k is not None and cfg.top_k < scores.shape[-1] and self.mirostat is None:
            scores, idx = torch.topk(scores, cfg.top_k)  # temperature is monotonic: same top k after it
        if self.dynatemp is not None:
            scores = self.dynatemp(input_ids, scores)
        elif cfg.temperature != 1.0:
            scores = scores / cfg.temperature
        if self.mirostat is not None:  # as llama.cpp: temperature, then mirostat alone
            return self.mirostat.truncate(scores), idx
        return P.apply(self.warpers, input_ids, scores), idx

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor, step: int) -> Selection:
        logits = logits.float()
        top = logits.amax(-1)  # NaN propagates through max: one pass finds NaN and +inf rows
        bad = top.isnan() | (top == float("inf"))
        scores = P.apply(self.token_processors, input_ids, logits)
        if self.config.greedy:
            tokens = scores.argmax(-1)
            nothing = scores.gather(1, tokens[:, None])[:, 0] == P.NEG_INF
            logprobs = None
            if self.config.return_logprobs:
                logprobs = scores.log_softmax(-1).gather(1, tokens[:, None])[:, 0]
            return Selection(tokens, logprobs, bad, nothing)
        keys = None if self.seeds is None else rng.row_keys(self.seeds, step)
        for w in self.warpers:
            if isinstance(w, S.XTC):
                w.keys = keys
        vals, idx = self._warp(input_ids, scores)
        if idx is None and self.mirostat is None and vals.device.type == "cpu":  # counting syncs a GPU
            vals, idx = _survivors(vals)
        choice = (vals + rng.gumbel(keys, idx, vals)).argmax(-1, keepdim=True)  # (B, 1)
        if self.mirostat is not None:
            self.mirostat.update(vals, choice[:, 0])
        tokens = choice if idx is None else idx.gather(1, choice)
        nothing = vals.gather(1, choice)[:, 0] == P.NEG_INF
        logprobs = vals.log_softmax(-1).gather(1, choice)[:, 0] if self.config.return_logprobs else None
        return Selection(tokens[:, 0], logprobs, bad, nothing)


def _survivors(vals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tokens a chain left finite, when they are few (min-p, XTC, top-nσ over a whole vocabulary):
    the Gumbel noise is then drawn for them only. It is keyed by token id, so the choice is the same."""
    return C.compact(vals)
