"""Mixture-of-experts feed-forward blocks: routers (softmax top-k, sigmoid group-limited, sigmoid top-k) and
expert dispatch by sorting tokens per expert.

`dispatch` never loops over tokens: the (token, slot) pairs are sorted by expert, each expert that received
tokens runs once on its contiguous block, and one gather puts the outputs back in token order.
Experts are HF's own submodules (`experts.0.gate_proj` ... or the fused 3-D tensors Llama 4 stores), so a
layer's state dict loads with `assign=True` and a part only ever holds the experts of its own layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llm_model_parts.layers.linear import Linear
from llm_model_parts.layers.mlp import GatedMLP, activation

ExpertFn = Callable[[int, torch.Tensor], torch.Tensor]


def dispatch(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    expert: ExpertFn,
    num_experts: int,
) -> torch.Tensor:
    """x (N, hidden), top_k_index / top_k_weights (N, K) -> sum_k weight * expert_k(x), shape (N, hidden).

    `expert(e, rows)` runs expert e on rows (n_e, hidden). Experts with no token are skipped.
    """
    n, k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)  # (N*K,) (token, slot) pairs grouped by expert
    weights = top_k_weights.reshape(-1)[order]
    counts = torch.bincount(flat, minlength=num_experts).tolist()  # one host sync per layer
    rows = x[order // k]  # (N*K, hidden), rows of one expert are contiguous
    outputs = []
    offset = 0
    for e, count in enumerate(counts):
        if count:
            block = slice(offset, offset + count)
            outputs.append(expert(e, rows[block]) * weights[block, None].to(x.dtype))
            offset += count
    if not outputs:
        return torch.zeros_like(x)
    # back to (token, slot) order with a gather (a scatter-add is slow on CPU), then sum the k slots
    return torch.cat(outputs).index_select(0, torch.argsort(order)).view(n, k, -1).sum(dim=1)


def softmax_top_k(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral / Qwen-MoE routing: softmax over experts in fp32, keep the top k (optionally renormalised)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, index = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, index


class ExpertList(nn.ModuleList):
    """`experts.<e>.<gate>/<up>/<down>` as separate Linear layers (Mixtral's w1/w3/w2, Qwen's gate/up/down)."""

    def __init__(
        self, num_experts: int, hidden: int, intermediate: int, act: str, names: tuple[str, str, str]
    ) -> None:
        super().__init__(_Expert(hidden, intermediate, act, names) for _ in range(num_experts))

    def run(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        return self[e](rows)


class _Expert(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str, names: tuple[str, str, str]) -> None:
        super().__init__()
        self._names = names
        gate, up, down = names
        self.add_module(gate, Linear(hidden, intermediate, bias=False))
        self.add_module(up, Linear(hidden, intermediate, bias=False))
        self.add_module(down, Linear(intermediate, hidden, bias=False))
        self.act_fn = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self._names)
        return down(self.act_fn(gate(x)) * up(x))


class MixtralSparseMoe(nn.Module):
    """Mixtral's `block_sparse_moe`: `gate` (router) and `experts.<e>.w1/w2/w3`."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, act: str) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.gate = Linear(hidden, num_experts, bias=False)
        self.experts = ExpertList(num_experts, hidden, intermediate, act, ("w1", "w3", "w2"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, index = softmax_top_k(self.gate(flat), self.top_k, normalize=True)
        return dispatch(flat, index, weights, self.experts.run, self.num_experts).view(shape)


class QwenSparseMoe(nn.Module):
    """Qwen2-MoE / Qwen3-MoE `mlp`: `gate`, `experts.<e>.gate_proj/up_proj/down_proj`, and for Qwen2-MoE a
    `shared_expert` scaled by `sigmoid(shared_expert_gate(x))`."""

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        num_experts: int,
        top_k: int,
        act: str,
        *,
        norm_topk_prob: bool,
        shared_intermediate: int = 0,
    ) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.gate = Linear(hidden, num_experts, bias=False)
        self.experts = ExpertList(
            num_experts, hidden, intermediate, act, ("gate_proj", "up_proj", "down_proj")
        )
        self.shared_expert = GatedMLP(hidden, shared_intermediate, act) if shared_intermediate else None
        self.shared_expert_gate = Linear(hidden, 1, bias=False) if shared_intermediate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, index = softmax_top_k(self.gate(flat), self.top_k, self.norm_topk_prob)
        out = dispatch(flat, index, weights.to(flat.dtype), self.experts.run, self.num_experts)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.view(shape)


class DeepseekTopkRouter(nn.Module):
    """DeepSeek-V3's `gate`: sigmoid scores, `e_score_correction_bias` added for choosing only, the best
    `topk_group` of `n_group` groups (each scored by its top-2 sum), then top-k experts inside them."""

    def __init__(
        self,
        hidden: int,
        num_experts: int,
        top_k: int,
        n_group: int,
        topk_group: int,
        norm_topk_prob: bool,
        routed_scaling_factor: float,
    ) -> None:
        super().__init__()
        if num_experts % n_group:
            raise ValueError(f"config: n_routed_experts={num_experts} is not a multiple of n_group={n_group}")
        self.num_experts, self.top_k, self.n_group, self.topk_group = num_experts, top_k, n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (N, E)
        choice = scores + self.e_score_correction_bias.float()
        grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # (N, n_group)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0).bool()
        keep = group_mask[:, :, None].expand_as(grouped).reshape(-1, self.num_experts)
        index = torch.topk(choice.masked_fill(~keep, float("-inf")), k=self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, index)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, index


class DeepseekMoe(nn.Module):
    """DeepSeek-V3's MoE `mlp`: `gate` (router), `experts.<e>.gate_proj/up_proj/down_proj`, `shared_experts`."""

    def __init__(
        self, hidden: int, intermediate: int, n_shared: int, act: str, router: DeepseekTopkRouter
    ) -> None:
        super().__init__()
        self.num_experts = router.num_experts
        self.gate = router
        self.experts = ExpertList(
            router.num_experts, hidden, intermediate, act, ("gate_proj", "up_proj", "down_proj")
        )
        self.shared_experts = GatedMLP(hidden, intermediate * n_shared, act) if n_shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, index = self.gate(flat)
        out = dispatch(flat, index, weights, self.experts.run, self.num_experts).view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class Llama4Experts(nn.Module):
    """Llama 4's experts as two fused tensors: `gate_up_proj` (E, hidden, 2 * I), `down_proj` (E, I, hidden)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act: str) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, hidden, 2 * intermediate))
        self.down_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.act_fn = activation(act)

    def run(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        gate, up = (rows @ self.gate_up_proj[e]).chunk(2, dim=-1)
        return (up * self.act_fn(gate)) @ self.down_proj[e]


class Llama4Moe(nn.Module):
    """Llama 4's `feed_forward` on MoE layers: `router` (top-k, sigmoid of the kept logits, applied to the
    expert's input), `experts`, and an always-on `shared_expert`."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, act: str) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.router = Linear(hidden, num_experts, bias=False)
        self.experts = Llama4Experts(num_experts, hidden, intermediate, act)
        self.shared_expert = GatedMLP(hidden, intermediate, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits, index = torch.topk(self.router(flat), self.top_k, dim=1)
        scores = torch.sigmoid(logits.float()).to(flat.dtype)  # (N, K)
        n, k = index.shape
        # Llama 4 scales the expert's *input* by its score; dispatch scales outputs, so run on scaled rows.
        scaled = (flat[:, None, :] * scores[:, :, None]).reshape(n * k, -1)
        slot_index = index.reshape(n * k, 1)
        ones = torch.ones_like(slot_index, dtype=flat.dtype)
        routed = dispatch(scaled, slot_index, ones, self.experts.run, self.num_experts)
        out = self.shared_expert(flat) + routed.view(n, k, -1).sum(dim=1)
        return out.view(shape)
