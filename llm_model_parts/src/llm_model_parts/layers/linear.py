"""`nn.Linear` whose matmul is chosen per call by the number of rows, for row-major (HF) weights.

Decoding multiplies a handful of rows by each weight, and there `F.linear` (`x @ W.T`) is the slow
formulation on the CPU. Measured with MKL on 2 cores, fp32, SmolLM2's shapes: one row as `torch.mv(W, x)`
streams the weight 1.1-4x faster than `F.linear` (gate/up 0.28 ms instead of 1.18 ms); 2-64 rows as
`W @ x.T` 1.1-4x faster (the LM head at 4 rows: 24 ms instead of 63 ms; at 32 rows 49 ms instead of 61),
and a head much wider than its input (the LM head) at any row count (256 rows: 221 ms instead of 293).
Other row counts, other dtypes (measured: bf16 is slower through these routes) and other devices keep
`F.linear`. The storage is never changed for it: the same weights serve every batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 64  # measured: from 128 rows on, F.linear is as fast or faster for square-ish weights
WIDE = 16  # out_features >= WIDE * in_features (an LM head): W @ x.T at any row count


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`."""
    width = x.shape[-1]
    rows = x.numel() // width if width else 0
    cpu_fp32 = x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
    if not cpu_fp32 or rows == 0 or weight.dim() != 2 or weight.stride(-1) != 1:
        return F.linear(x, weight, bias)
    if rows > MAX_ROWS and weight.shape[0] < WIDE * width:
        return F.linear(x, weight, bias)
    if rows == 1:
        y = torch.mv(weight, x.reshape(width))
    else:
        y = torch.mm(weight, x.reshape(rows, width).t()).t().contiguous()
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same names) computing through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
