"""The API of llm-sampler 0.4.0, kept under its names and with its semantics so its users can upgrade."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llm_sampler import processors as P


def sample_huggingface(outputs: torch.Tensor, temperature: float, top_k: int | None = None) -> torch.Tensor:
    """One token per row from the last position of `outputs` [B, T, V]: top-k (HF's warper), then temperature
    (skipped when |temperature| <= 1e-7), softmax, multinomial. -> LongTensor[B]."""
    scores = outputs[:, -1, :]
    if top_k is not None:
        scores = P.TopK(top_k)(scores, scores)
    scores = scores / temperature if abs(temperature) > 1e-7 else scores
    probs = torch.nn.functional.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1).squeeze(1)


def sample_gpt_fast(
    outputs: torch.Tensor, temperature: float = 1.0, top_k: int | None = None
) -> torch.Tensor:
    """gpt-fast's sampler on the last position of row 0: temperature (at least 1e-5), top-k, exponential race
    (no host sync). -> IntTensor[1]."""
    logits = outputs[0, -1] / max(temperature, 1e-5)
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = torch.where(logits < v.select(-1, -1).unsqueeze(-1), -float("Inf"), logits)
    probs = torch.nn.functional.softmax(logits, dim=-1)
    q = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / q, dim=-1, keepdim=True).to(dtype=torch.int)


def create_batch_with_continuations(
    input_ids: torch.Tensor, all_continuation_ids: Sequence[torch.Tensor], padding_value: int
) -> torch.Tensor:
    """Rows `input_ids + continuation`, right-padded with `padding_value`. input_ids: [T] or [1, T]."""
    if input_ids.dim() == 2 and input_ids.shape[0] == 1:
        input_ids = input_ids.squeeze(0)
    rows = [torch.cat((input_ids, c.to(input_ids.device))) for c in all_continuation_ids]
    return torch.nn.utils.rnn.pad_sequence(rows, padding_value=padding_value, batch_first=True).to(
        input_ids.device
    )


def get_scores_of_continuations(
    logits: torch.Tensor, all_continuation_ids: Sequence[torch.Tensor], padding_value: int
) -> torch.Tensor:
    """[n, max_len] logits (not log-probabilities) of each continuation's tokens, read from the batch of
    `create_batch_with_continuations` as 0.4.0 did: from position -max_len-1 on, `padding_value`'s logit
    past a continuation's end."""
    length = max(len(c) for c in all_continuation_ids)
    start = -length - 1
    targets = torch.full((len(all_continuation_ids), length), padding_value, dtype=torch.long)
    for i, c in enumerate(all_continuation_ids):
        targets[i, : len(c)] = torch.as_tensor(c, dtype=torch.long).cpu()
    rows = logits[: len(all_continuation_ids), start : start + length]
    return rows.gather(-1, targets.to(rows.device)[..., None])[..., 0].detach().cpu()


def best_continuation_naive(scores: torch.Tensor, epsilon: float) -> torch.Tensor | None:
    """Index of the best row of `scores` [n, T], token by token: keep the rows within `epsilon` of the best
    score at each token until one is left; on a tie to the end, the first remaining row."""
    candidates = torch.arange(scores.shape[0])
    for token_index in range(scores.shape[1]):
        current = scores[candidates, token_index]
        candidates = candidates[torch.abs(current - current.max()) <= epsilon]
        if len(candidates) == 1:
            return candidates[0]
    return candidates[0] if len(candidates) > 0 else None


__all__ = [
    "best_continuation_naive",
    "create_batch_with_continuations",
    "get_scores_of_continuations",
    "sample_gpt_fast",
    "sample_huggingface",
]
