"""Beam search for any forward_func, with Hugging Face's semantics (transformers' vectorized `_beam_search`).

Per step: log-softmax of the logits, token processors on the log-probabilities, add the beam scores, keep the
top `max(2, 1 + n_eos) * num_beams` candidates; candidates ending with eos (or reaching the length limit)
become finished hypotheses scored `sum_logprobs / generated_len ** length_penalty`; the best unfinished
candidates continue. `early_stopping`: True stops a batch row once `num_beams` hypotheses are finished;
False stops when no running beam can beat the worst finished one at the current length (HF's heuristic);
"never" uses the best length still possible when `length_penalty > 0` (canonical beam search).

An incremental forward_func needs a `reorder(rows)` method (IncrementalHF has one) to follow the beams;
otherwise its cache is reset and the beams are re-sent whole each step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llm_sampler import processors as P
from llm_sampler.config import SamplingConfig
from llm_sampler.forward import Caller, ForwardFunc, as_batch, last_logits

NEG = -1.0e9


@dataclass
class BeamOutput:
    """`sequences` [B * num_return_sequences, T + new] (pad after the end), `scores` [B * n]: the
    length-penalised scores, best first within each prompt."""

    sequences: torch.Tensor
    scores: torch.Tensor
    prompt_len: int


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t [B, K, ...] gathered along K by idx [B, K2]."""
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.gather(t, 1, idx.expand(*idx.shape[:2], *t.shape[2:]))


def _check(num_beams: int, length_penalty: float, early_stopping: Any, n_return: int) -> None:
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")
    if not isinstance(length_penalty, (int, float)) or length_penalty != length_penalty:
        raise ValueError(f"length_penalty must be a float, got {length_penalty!r}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if not isinstance(n_return, int) or not 1 <= n_return <= num_beams:
        raise ValueError(
            f"num_return_sequences must be an int in [1, num_beams={num_beams}], got {n_return!r}"
        )


def beam_search(
    forward_func: ForwardFunc,
    input_ids: Any,
    max_new_tokens: int,
    *,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    attention_mask: Any = None,
    **params: Any,
) -> BeamOutput:
    """Beam search. `params`: the token processors of `sample` (repetition_penalty, no_repeat_ngram_size,
    bad_words_ids, logit_bias, min_new_tokens, logits_processors), `eos_token_id`, `pad_token_id`."""
    _check(num_beams, length_penalty, early_stopping, num_return_sequences)
    allowed = {"repetition_penalty", "penalize_prompt", "no_repeat_ngram_size", "bad_words_ids", "logit_bias",
               "min_new_tokens", "eos_token_id", "pad_token_id", "logits_processors", "presence_penalty",
               "frequency_penalty"}  # fmt: skip
    if set(params) - allowed:
        raise TypeError(
            f"beam_search does not take {sorted(set(params) - allowed)}; it takes {sorted(allowed)}"
        )
    config = SamplingConfig.from_kwargs(params)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    eos = config.eos_ids
    pad = config.pad_token_id if config.pad_token_id is not None else (eos or [0])[0]
    ids, mask = as_batch(input_ids, attention_mask, pad)
    batch, prompt_len = ids.shape
    nb, device = num_beams, ids.device
    max_len = prompt_len + max_new_tokens
    keep = max(2, 1 + len(eos)) * nb
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    processors = config.token_processors(prompt_len)

    running = torch.full((batch, nb, max_len), pad, dtype=torch.long, device=device)
    running[:, :, :prompt_len] = ids[:, None]
    finished_seqs = running.clone()
    running_scores = torch.zeros(batch, nb, device=device)
    running_scores[:, 1:] = NEG
    beam_scores = torch.full((batch, nb), NEG, device=device)
    finished_lens = torch.full((batch, nb), prompt_len, dtype=torch.long, device=device)
    is_finished = torch.zeros(batch, nb, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    flat_mask = None if mask is None else mask.repeat_interleave(nb, 0)
    caller = Caller(forward_func)
    follow = caller.incremental and hasattr(forward_func, "reorder")
    caller.reset()
    top_nb = torch.arange(keep, device=device) < nb
    offsets = torch.arange(batch, device=device)[:, None] * nb

    for cur_len in range(prompt_len, max_len):
        flat = running[:, :, :cur_len].reshape(batch * nb, cur_len)
        if caller.incremental and not follow:
            caller.reset()
        logits = last_logits(caller(flat, flat_mask), batch * nb).float()
        if cur_len == prompt_len:
            config.check_vocab(logits.shape[-1])
        vocab = logits.shape[-1]
        logp = P.apply(processors, flat, logits.log_softmax(-1)).view(batch, nb, vocab)
        logp = (logp + running_scores[:, :, None]).view(batch, nb * vocab)
        top_logp, top_idx = torch.topk(logp, keep)
        src_beam = top_idx // vocab
        top_seqs = _gather(running, src_beam)
        top_seqs[:, :, cur_len] = top_idx % vocab
        hits = (
            torch.isin(top_seqs[:, :, cur_len], eos_t) if eos else torch.zeros_like(top_idx, dtype=torch.bool)
        )
        if cur_len + 1 >= max_len:
            hits = torch.ones_like(hits)
        # continue with the best candidates that did not finish
        cont_logp = top_logp + hits.float() * NEG
        nxt = torch.topk(cont_logp, nb).indices
        running = _gather(top_seqs, nxt)
        running_scores = _gather(cont_logp, nxt)
        # add the candidates that finished to the finished hypotheses
        new_scores = top_logp / ((cur_len + 1 - prompt_len) ** length_penalty)
        full = torch.all(is_finished, -1, keepdim=True) & (early_stopping is True)
        just_done = hits & top_nb[None]
        new_scores = (
            new_scores + full.float() * NEG + (~improvable).float() * NEG + (~just_done).float() * NEG
        )
        merged_scores = torch.cat([beam_scores, new_scores], 1)
        best = torch.topk(merged_scores, nb).indices
        finished_seqs = _gather(torch.cat([finished_seqs, top_seqs], 1), best)
        beam_scores = _gather(merged_scores, best)
        finished_lens = _gather(
            torch.cat([finished_lens, torch.full_like(new_scores, cur_len + 1, dtype=torch.long)], 1), best
        )
        is_finished = _gather(torch.cat([is_finished, just_done], 1), best)
        if follow:
            forward_func.reorder((_gather(src_beam, nxt) + offsets).reshape(-1))  # type: ignore[attr-defined]
        if flat_mask is not None:
            flat_mask = torch.cat([flat_mask, torch.ones_like(flat_mask[:, :1])], 1)
        # HF's early-stop heuristic, then its stopping condition
        if early_stopping == "never" and length_penalty > 0.0:
            best_len = max_len - prompt_len
        else:
            best_len = cur_len + 1 - prompt_len
        best_running = running_scores[:, :1] / (best_len**length_penalty)
        worst_done = torch.where(
            is_finished, torch.min(beam_scores, 1, keepdim=True).values, torch.tensor(NEG)
        )
        improvable = improvable & torch.any(best_running > worst_done, -1, keepdim=True)
        open_beam = not bool(torch.all(is_finished)) or early_stopping is not True
        if not (bool(improvable.any()) and open_beam and not bool(hits.all())):
            break

    n = num_return_sequences
    lens = finished_lens[:, :n].reshape(-1)
    out = finished_seqs[:, :n].reshape(batch * n, max_len)[:, : int(lens.max())]
    return BeamOutput(out, beam_scores[:, :n].reshape(-1), prompt_len)
