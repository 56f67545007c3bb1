"""An ordered sampler chain, `samplers=[...]` with llama.cpp's names (`samplers="llama.cpp"` for its order).

Without `samplers`, the order is transformers' (see `llm_sampler.processors`). With it, only the samplers
named run, in that order, after the bans that always apply first (logit_bias, no_repeat_ngram_size,
bad_words_ids, min_new_tokens, user processors). A sampler named but switched off by its parameters is a
no-op, as in llama.cpp. After `top_k` the later steps run on the k survivors only, like the default path.

On the CPU a filter's survivors are compacted (`compact`: one `nonzero` pass), so the later steps and the
draw touch only them. Filters that keep the scores above a row threshold (top-nσ, then min-p in llama.cpp's
logit-space form, max + log(min_p)) are applied together: min-p's threshold is relative to the max, which
no filter removes, so the two cost one comparison and one compaction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from llm_sampler import processors as P
from llm_sampler import samplers as S

if TYPE_CHECKING:
    from llm_sampler.config import SamplingConfig

LLAMA_CPP_ORDER = (
    "penalties",
    "dry",
    "top_n_sigma",
    "top_k",
    "typical_p",
    "top_p",
    "min_p",
    "xtc",
    "temperature",
)
NAMES = frozenset(LLAMA_CPP_ORDER) | {"top_h", "epsilon_cutoff", "eta_cutoff"}
TOKEN_STEPS = frozenset({"penalties", "dry"})  # need token ids, so the whole vocabulary
FILTERS = frozenset({"top_n_sigma", "typical_p", "top_p", "min_p", "epsilon_cutoff", "eta_cutoff", "top_h"})
THRESHOLDS = frozenset({"top_n_sigma", "min_p"})  # keep the scores >= a row's threshold (`.threshold`)
MAX_RELATIVE = frozenset({"min_p"})  # its threshold is the max's minus a constant: the same after any filter


def resolve(samplers: str | Sequence[str] | None) -> list[str] | None:
    """The chain's names, checked; None for transformers' default order."""
    if samplers is None:
        return None
    if isinstance(samplers, str):
        if samplers != "llama.cpp":
            raise ValueError(f'samplers must be a list of sampler names or "llama.cpp", got {samplers!r}')
        return list(LLAMA_CPP_ORDER)
    names = list(samplers)
    unknown = [n for n in names if n not in NAMES]
    if unknown or not all(isinstance(n, str) for n in names):
        raise ValueError(f"samplers holds unknown name(s) {unknown}; valid ones: {sorted(NAMES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"samplers names a sampler twice: {names}")
    return names


def step(config: SamplingConfig, name: str, prompt_len: int) -> list[P.LogitsProcessor]:
    """The processors behind one chain name (empty when its parameters switch it off)."""
    c = config
    if name == "penalties":
        out: list[P.LogitsProcessor] = []
        if c.repetition_penalty != 1.0:
            out.append(P.RepetitionPenalty(c.repetition_penalty, 0 if c.penalize_prompt else prompt_len))
        if c.presence_penalty or c.frequency_penalty:
            out.append(P.PresenceFrequencyPenalty(c.presence_penalty, c.frequency_penalty, prompt_len))
        return out
    if name == "dry":
        return [p for p in c.llama_cpp_processors() if isinstance(p, S.DRY)]
    if name == "top_n_sigma":
        return [S.TopNSigma(c.top_n_sigma)] if c.top_n_sigma > 0 else []
    if name == "top_k":
        return [P.TopK(c.top_k)] if c.top_k is not None else []
    if name == "temperature":
        if c.dynatemp_range > 0:
            return [S.DynamicTemperature(c.temperature, c.dynatemp_range, c.dynatemp_exponent)]
        return [P.Temperature(c.temperature)] if c.temperature not in (0, 1.0) else []
    warpers: dict[str, tuple[bool, Callable[[], P.LogitsProcessor]]] = {
        "typical_p": (c.typical_p is not None and c.typical_p < 1.0, lambda: P.TypicalP(c.typical_p or 1.0)),
        "top_p": (c.top_p is not None and c.top_p < 1.0, lambda: P.TopP(c.top_p or 1.0)),
        "min_p": (bool(c.min_p), lambda: P.MinP(c.min_p or 0.0)),
        "epsilon_cutoff": (bool(c.epsilon_cutoff), lambda: P.EpsilonCutoff(c.epsilon_cutoff or 0.0)),
        "eta_cutoff": (bool(c.eta_cutoff), lambda: P.EtaCutoff(c.eta_cutoff or 0.0)),
        "top_h": (c.top_h is not None, lambda: S.TopH(c.top_h or 1.0)),
        "xtc": (bool(c.xtc_probability), lambda: S.XTC(c.xtc_probability, c.xtc_threshold)),
    }
    on, make = warpers[name]
    return [make()] if on else []


class Chain:
    """`chain(input_ids, scores) -> (values, token ids of the values or None for the whole vocabulary)`."""

    def __init__(self, config: SamplingConfig, names: Sequence[str], prompt_len: int) -> None:
        self.steps = [(n, p) for n in names for p in step(config, n, prompt_len)]

    def processors(self) -> list[P.LogitsProcessor]:
        return [p for _, p in self.steps]

    def token_steps(self) -> list[P.LogitsProcessor]:
        """The steps that run in greedy mode (those that look at token ids)."""
        return [p for n, p in self.steps if n in TOKEN_STEPS]

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx: torch.Tensor | None = None
        vocab = scores.shape[-1]
        low: torch.Tensor | None = None  # (B, 1): threshold filters met so far keep scores >= low
        for name, proc in self.steps:
            joins = name in THRESHOLDS and (low is None or name in MAX_RELATIVE)
            if low is not None and not joins:
                scores, idx = _keep(scores, idx, low)
                low = None
            if joins:  # applied once, with the next step that is not one
                t = proc.threshold(scores)  # type: ignore[attr-defined]
                low = t if low is None else torch.maximum(low, t)
            elif name == "top_k" and isinstance(proc, P.TopK) and proc.top_k < scores.shape[-1]:
                if idx is None:
                    scores, idx = torch.topk(scores, proc.top_k)
                else:
                    scores, pos = torch.topk(scores, min(proc.top_k, scores.shape[-1]))
                    idx = idx.gather(1, pos)
            elif name in TOKEN_STEPS and idx is not None:
                full = torch.full((scores.shape[0], vocab), P.NEG_INF, device=scores.device)
                # amax: a padded slot of `compact` repeats token 0 with -inf
                scores = proc(input_ids, full.scatter_reduce(1, idx, scores, "amax")).gather(1, idx)
            else:
                scores = proc(input_ids, scores)
                if idx is None and name in FILTERS and scores.device.type == "cpu":  # counting syncs a GPU
                    scores, idx = compact(scores)
        if low is not None:
            scores, idx = _keep(scores, idx, low)
        return scores, idx


def _keep(
    scores: torch.Tensor, idx: torch.Tensor | None, low: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    keep = scores >= low
    if idx is not None or scores.device.type != "cpu":  # counting survivors syncs a GPU
        return scores.masked_fill(~keep, P.NEG_INF), idx
    return compact(scores, keep)


def compact(
    scores: torch.Tensor, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kept scores of each row (`keep`; None: the finite ones) and their token ids, (B, k) for the row
    keeping most, padded with -inf (token id 0), when few are kept: later steps then run on them only, as
    after top_k. Over the whole vocabulary (ids None) when most are kept. One `nonzero` pass (a bool sum or
    topk costs 5-10x more)."""
    b, v = scores.shape
    mask = scores > P.NEG_INF if keep is None else keep
    rows, cols = mask.nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=b)
    k = int(counts.max()) if b else 0
    if k == 0 or 4 * k > v:
        return (scores if keep is None else scores.masked_fill(~keep, P.NEG_INF)), None
    pos = torch.arange(rows.numel()) - (counts.cumsum(0) - counts)[rows]
    vals = torch.full((b, k), P.NEG_INF, dtype=scores.dtype)
    ids = torch.zeros((b, k), dtype=torch.long)
    vals[rows, pos] = scores[rows, cols]
    ids[rows, pos] = cols
    return vals, ids
