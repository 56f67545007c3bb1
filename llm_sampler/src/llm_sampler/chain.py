"""An ordered sampler chain, `samplers=[...]` with llama.cpp's names (`samplers="llama.cpp"` for its order).

Without `samplers`, the order is transformers' (see `llm_sampler.processors`). With it, only the samplers
named run, in that order, after the bans that always apply first (logit_bias, no_repeat_ngram_size,
bad_words_ids, min_new_tokens, user processors). A sampler named but switched off by its parameters is a
no-op, as in llama.cpp. After `top_k` the later steps run on the k survivors only, like the default path.
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
        for name, proc in self.steps:
            if name == "top_k" and isinstance(proc, P.TopK) and proc.top_k < scores.shape[-1]:
                if idx is None:
                    scores, idx = torch.topk(scores, proc.top_k)
                else:
                    scores, pos = torch.topk(scores, min(proc.top_k, scores.shape[-1]))
                    idx = idx.gather(1, pos)
            elif name in TOKEN_STEPS and idx is not None:
                full = torch.full((scores.shape[0], vocab), P.NEG_INF, device=scores.device)
                scores = proc(input_ids, full.scatter(1, idx, scores)).gather(1, idx)
            else:
                scores = proc(input_ids, scores)
                if idx is None and name in FILTERS and scores.device.type == "cpu":  # counting syncs a GPU
                    scores, idx = _compact(scores)
        return scores, idx


def _compact(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The finite scores and their token ids, when a filter left few (the later steps then run on them
    only, as after top_k); None ids when most survive."""
    k = int((scores > P.NEG_INF).sum(-1).max())
    if k == 0 or 4 * k > scores.shape[-1]:
        return scores, None
    return torch.topk(scores, k)
