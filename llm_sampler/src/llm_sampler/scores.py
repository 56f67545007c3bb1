"""`Scores`: the log-likelihoods of a question's options, and how to pick the best one."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

NORMALIZATIONS = ("none", "token", "char", "byte", "unconditional")


def check_normalize(normalize: str) -> str:
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    return normalize


@dataclass
class OptionScore:
    """One option: `loglikelihood` (sum of `token_logprobs`), `is_greedy` (every option token is the model's
    argmax, as lm-evaluation-harness defines it), the option's `text` when scored from text, and its
    `unconditional` log-likelihood when mutual information was asked for. An empty option scores 0.0 (log 1)
    and is greedy."""

    token_logprobs: list[float]
    is_greedy: bool
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    unconditional: float | None = None

    @property
    def loglikelihood(self) -> float:
        return math.fsum(self.token_logprobs)

    @property
    def num_tokens(self) -> int:
        return len(self.token_logprobs)

    def normalized(self, normalize: str) -> float:
        """The option's score under a normalization (lm-evaluation-harness's acc, acc_norm, acc_bytes, ...).

        none: loglikelihood · token: per token · char: per character of `text` (acc_norm) · byte: per UTF-8
        byte of `text` (acc_bytes) · unconditional: loglikelihood minus the unconditional one (acc_mutual_info).
        Dividing an empty option's 0.0 by zero gives 0.0.
        """
        ll = self.loglikelihood
        if check_normalize(normalize) == "none":
            return ll
        if normalize == "token":
            return ll / self.num_tokens if self.num_tokens else 0.0
        if normalize == "unconditional":
            if self.unconditional is None:
                raise ValueError(
                    "normalize='unconditional' needs the unconditional scores: pass normalize= to score_texts"
                )
            return ll - self.unconditional
        if self.text is None:
            raise ValueError(f"normalize={normalize!r} needs the option's text: use score_texts / score_many")
        n = len(self.text) if normalize == "char" else len(self.text.encode("utf-8"))
        return ll / n if n else 0.0


@dataclass
class Scores(Sequence[OptionScore]):
    """The options of one question, in the order given. `scores[i].loglikelihood`, `scores.best()`."""

    options: list[OptionScore]
    normalize: str = "none"

    def __getitem__(self, i: int) -> OptionScore:  # type: ignore[override]
        return self.options[i]

    def __len__(self) -> int:
        return len(self.options)

    def __iter__(self) -> Iterator[OptionScore]:
        return iter(self.options)

    @property
    def loglikelihoods(self) -> list[float]:
        return [o.loglikelihood for o in self.options]

    def normalized(self, normalize: str | None = None) -> list[float]:
        return [o.normalized(normalize or self.normalize) for o in self.options]

    def best(self, normalize: str | None = None) -> int:
        """Index of the best option (the first one on ties, like numpy's argmax in lm-evaluation-harness)."""
        values = self.normalized(normalize)
        return max(range(len(values)), key=lambda i: (values[i], -i))
