"""Logits processors: plain callables `(input_ids, scores) -> scores`.

`input_ids` is LongTensor[B, T], everything the rows hold so far (prompt, with its padding, and the tokens
generated); `scores` is FloatTensor[B, N], fp32. A processor returns new scores; it never changes its inputs.
Filtered tokens get `-inf`. Any callable with this signature can be passed as a user processor.

Two kinds:
- token processors look at token ids (penalties, bans, biases) and need the whole vocabulary (N == V);
- warpers (`Temperature`, `TopP`, `MinP`, `TypicalP`, `EpsilonCutoff`, `EtaCutoff`) depend only on the
  distribution, so they also work on a compact `[B, k]` slice of the survivors of top-k. The sampler uses
  that: after `topk(k)` every later warper runs on k values instead of the whole vocabulary.

The order the sampler applies them in (the order of Hugging Face's `generate`):
    logit_bias, repetition_penalty, presence/frequency penalties, no_repeat_ngram, bad_words, min_new_tokens,
    user processors, temperature, top_k, top_p, min_p, typical_p, epsilon_cutoff, eta_cutoff
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

NEG_INF = float("-inf")


class LogitsProcessor(Protocol):
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor: ...


def _keep_top(scores: torch.Tensor, remove: torch.Tensor, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Never remove the `min_tokens_to_keep` highest-scoring tokens."""
    k = min(min_tokens_to_keep, scores.shape[-1])
    return remove & (scores < torch.topk(scores, k).values[..., -1:])


class LogitBias:
    """Add a fixed bias per token id (OpenAI's `logit_bias`); `-inf` bans a token."""

    def __init__(self, bias: Mapping[int, float]) -> None:
        self.ids = torch.tensor(list(bias.keys()), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        scores[:, self.ids.to(scores.device)] += self.values.to(scores.device)
        return scores


class RepetitionPenalty:
    """CTRL's repetition penalty, as Hugging Face applies it: a seen token's logit is divided by `penalty`
    when positive, multiplied when negative. With `prompt_len` set, only tokens after the prompt count."""

    def __init__(self, penalty: float, prompt_len: int = 0) -> None:
        self.penalty = penalty
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        seen = input_ids[:, self.prompt_len :]
        if seen.shape[1] == 0:
            return scores
        values = scores.gather(1, seen)
        values = torch.where(values < 0, values * self.penalty, values / self.penalty)
        return scores.scatter(1, seen, values)


class PresenceFrequencyPenalty:
    """OpenAI's penalties over the generated tokens: `presence` once per token seen, `frequency` per time seen."""

    def __init__(self, presence: float, frequency: float, prompt_len: int) -> None:
        self.presence = presence
        self.frequency = frequency
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_len :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(
            1, generated, torch.ones_like(generated, dtype=scores.dtype)
        )
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class NoRepeatNGram:
    """Ban any token that would repeat an n-gram already in the row (prompt included, as Hugging Face)."""

    def __init__(self, ngram_size: int) -> None:
        self.n = ngram_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        n, t = self.n, input_ids.shape[1]
        if t + 1 < n:
            return scores
        if n == 1:
            banned = torch.zeros_like(scores).scatter_add_(
                1, input_ids, torch.ones_like(input_ids, dtype=scores.dtype)
            )
            return scores.masked_fill(banned > 0, NEG_INF)
        windows = input_ids.unfold(1, n, 1)  # (B, T-n+1, n)
        tail = input_ids[:, t - n + 1 :]  # (B, n-1)
        match = (windows[:, :, :-1] == tail[:, None, :]).all(-1)  # (B, T-n+1)
        hits = torch.zeros_like(scores).scatter_add_(1, windows[:, :, -1], match.to(scores.dtype))
        return scores.masked_fill(hits > 0, NEG_INF)


class BadWords:
    """Ban token sequences: the last token of a sequence is banned when the row ends with the rest of it."""

    def __init__(self, bad_words_ids: Sequence[Sequence[int]]) -> None:
        self.single = torch.tensor([w[0] for w in bad_words_ids if len(w) == 1], dtype=torch.long)
        self.multi = [list(w) for w in bad_words_ids if len(w) > 1]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        banned = torch.zeros_like(scores, dtype=torch.bool)
        if self.single.numel():
            banned[:, self.single.to(scores.device)] = True
        for word in self.multi:
            prefix = torch.tensor(word[:-1], device=input_ids.device)
            if input_ids.shape[1] >= len(prefix):
                hit = (input_ids[:, input_ids.shape[1] - len(prefix) :] == prefix).all(-1)  # (B,)
                banned[:, word[-1]] |= hit
        return scores.masked_fill(banned, NEG_INF)


class MinNewTokens:
    """Forbid the eos tokens until `min_new_tokens` tokens have been generated after the prompt."""

    def __init__(self, min_new_tokens: int, eos_token_ids: Sequence[int], prompt_len: int) -> None:
        self.min_new_tokens = min_new_tokens
        self.eos = torch.tensor(list(eos_token_ids), dtype=torch.long)
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] - self.prompt_len >= self.min_new_tokens:
            return scores
        scores = scores.clone()
        scores[:, self.eos.to(scores.device)] = NEG_INF
        return scores


class Temperature:
    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


class TopK:
    """Keep the k highest scores (ties with the k-th are kept, as Hugging Face does)."""

    def __init__(self, top_k: int) -> None:
        self.top_k = top_k

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.top_k, scores.shape[-1])
        return scores.masked_fill(scores < torch.topk(scores, k).values[..., -1:], NEG_INF)


class TopP:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches `top_p`."""

    def __init__(self, top_p: float) -> None:
        self.top_p = top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - self.top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(1, order, remove_sorted)
        return scores.masked_fill(remove, NEG_INF)


class MinP:
    """Keep tokens whose probability is at least `min_p` times the top token's."""

    def __init__(self, min_p: float) -> None:
        self.min_p = min_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = scores.softmax(dim=-1)
        remove = probs < self.min_p * probs.amax(dim=-1, keepdim=True)
        return scores.masked_fill(_keep_top(scores, remove), NEG_INF)

    def threshold(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, 1): llama.cpp's min-p, in logit space: keep the logits >= max + log(min_p)."""
        return scores.amax(-1, keepdim=True) + math.log(self.min_p)


class TypicalP:
    """Locally typical sampling (Meister et al. 2022), as Hugging Face's `TypicalLogitsWarper`."""

    def __init__(self, mass: float) -> None:
        self.mass = mass

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp = scores.log_softmax(dim=-1)
        entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)
        shifted = (-logp - entropy).abs()
        sorted_shifted, order = torch.sort(shifted, descending=False)
        cumulative = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
        last = (cumulative < self.mass).sum(dim=-1).clamp_(max=shifted.shape[-1] - 1)
        remove_sorted = sorted_shifted > sorted_shifted.gather(-1, last[:, None])
        remove_sorted[..., :1] = False
        remove = remove_sorted.scatter(1, order, remove_sorted)
        return scores.masked_fill(remove, NEG_INF)


class EpsilonCutoff:
    """Truncation sampling (Hewitt et al. 2022): drop tokens with probability below `epsilon`."""

    def __init__(self, epsilon: float) -> None:
        self.epsilon = epsilon

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        remove = scores.softmax(dim=-1) < self.epsilon
        return scores.masked_fill(_keep_top(scores, remove), NEG_INF)


class EtaCutoff:
    """Eta sampling: the cutoff is min(eta, sqrt(eta) * exp(-entropy))."""

    def __init__(self, eta: float) -> None:
        self.eta = eta

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp = scores.log_softmax(dim=-1)
        probs = logp.exp()
        entropy = -(logp * probs).nansum(-1, keepdim=True)
        cutoff = torch.minimum(torch.tensor(self.eta), math.sqrt(self.eta) * torch.exp(-entropy))
        return scores.masked_fill(_keep_top(scores, probs < cutoff), NEG_INF)


def apply(
    processors: Sequence[LogitsProcessor], input_ids: torch.Tensor, scores: torch.Tensor
) -> torch.Tensor:
    for processor in processors:
        scores = processor(input_ids, scores)
    return scores
