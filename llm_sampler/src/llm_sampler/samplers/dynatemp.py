"""Dynamic (entropy-scaled) temperature, as llama.cpp's `dynatemp_range` / `dynatemp_exponent`."""

from __future__ import annotations

import torch

MIN_TEMPERATURE = 1e-4  # a zero temperature (t_min = 0, entropy 0) means greedy: keep it finite


class DynamicTemperature:
    """Divide by `t_min + (t_max - t_min) * (H / log N) ** exponent`, t_min/t_max = temperature -/+ range
    (t_min clamped at 0), H the entropy of the row's distribution and N its number of finite candidates."""

    def __init__(self, temperature: float, dynatemp_range: float, exponent: float = 1.0) -> None:
        self.t_min = max(0.0, temperature - dynatemp_range)
        self.t_max = temperature + dynatemp_range
        self.exponent = exponent

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp = scores.log_softmax(-1)
        entropy = -(logp.exp() * logp).nan_to_num(0.0).sum(-1, keepdim=True)
        n = scores.isfinite().sum(-1, keepdim=True).to(scores.dtype)
        max_entropy = n.clamp(min=2).log()
        t = self.t_min + (self.t_max - self.t_min) * (entropy / max_entropy).pow(self.exponent)
        t = torch.where(n > 1, t, torch.ones_like(t))  # llama.cpp leaves a single candidate alone
        return scores / t.clamp(min=MIN_TEMPERATURE)
