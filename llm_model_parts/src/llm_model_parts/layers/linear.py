"""`nn.Linear` whose matmul is chosen per call by the number of rows, for row-major (HF) weights.

On the CPU in fp32, `F.linear` (`x @ W.T`, MKL) is not the fastest formulation for the row counts of
decoding and prefill. Measured with MKL and oneDNN on 2 cores, SmolLM2's shapes, minimum of 7 runs
(`tools/bench/bench_linear.py`):
- oneDNN's inner product on the plain weight (`mkldnn._linear_pointwise`, no packing, no copy) is the
  fastest at one row for every weight: 1.8-2x `F.linear` for q/k/v, gate/up and the LM head, and
  1.4x `torch.mv` (MKL's gemv, which an earlier version used) for down_proj, deeper than wide (149
  against 209 us; docs/benchmarks.md, "CPU decode"); from 7 rows on it is the fastest for every weight
  (the LM head at 256 rows: 99 ms instead of 191 ms);
- `W @ x.T` is fastest at 2-6 rows (up to 3x `F.linear`) for weights at least as wide as deep.
Other dtypes, devices and autograd keep `F.linear`. Under torch.compile one row stays `torch.mv`,
which inductor lowers to a fused vectorised reduction (3x MKL's gemv); more rows keep `F.linear`. The
storage is never changed for it: the same weights serve every batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEW_ROWS = 6  # up to here W @ x.T beats both F.linear and oneDNN for most weights


def _onednn() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


ONEDNN = _onednn()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`."""
    width = x.shape[-1]
    rows = x.numel() // width if width else 0
    if (
        x.device.type != "cpu"
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or rows == 0
        or weight.dim() != 2
        or weight.stride(-1) != 1
        or torch.is_grad_enabled()
    ):
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():  # inductor turns mv into its own fused reduction; mm stays MKL
        return F.linear(x, weight, bias) if rows > 1 else _mv(x, weight, bias)
    deep = weight.shape[1] > weight.shape[0]  # more inputs than outputs (down_proj)
    x2 = x.reshape(rows, width).contiguous()
    if rows == 1 and not ONEDNN:
        y = torch.mv(weight, x2[0]).view(1, -1)
    elif 1 < rows <= FEW_ROWS and not (deep and ONEDNN):
        y = torch.mm(weight, x2.t()).t().contiguous()
    elif ONEDNN:
        y = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "")
        return y.view(*x.shape[:-1], weight.shape[0])
    else:
        return F.linear(x, weight, bias)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


def _mv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = torch.mv(weight, x.reshape(-1))
    return (y if bias is None else y + bias).view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same names) computing through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
