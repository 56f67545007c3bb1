"""Plain module stacks: OffloadedSequential, buffers (streamed when the source has them, kept otherwise), stats."""

from __future__ import annotations

import copy

import torch
from torch import nn

from llm_offload import CpuSource, OffloadedSequential, offload


class Block(nn.Module):
    """A layer with a persistent buffer from the checkpoint and a cache-like buffer the source does not hold."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.norm = nn.BatchNorm1d(8).eval()
        self.register_buffer("seen", torch.zeros(1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += 1  # state kept across calls, like a KV cache
        return torch.relu(self.norm(self.lin(x)))


def make_stack(n: int = 5) -> list[Block]:
    torch.manual_seed(0)
    blocks = [Block() for _ in range(n)]
    for b in blocks:
        b.norm.running_mean.normal_()
        b.norm.running_var.uniform_(0.5, 2.0)
    return blocks


def test_offloaded_sequential_equals_resident() -> None:
    ref = make_stack()
    blocks = copy.deepcopy(ref)
    seq = OffloadedSequential(blocks, CpuSource.from_modules(blocks), "cpu", prefetch_depth=1)
    assert blocks[0].norm.running_mean.device.type == "meta"  # persistent buffer: streamed
    assert blocks[0].seen.device.type == "cpu"  # not in the source: stays, like a KV cache
    x = torch.randn(4, 8)
    want = x
    with torch.no_grad():
        for b in ref:
            want = b(want)
        for _ in range(3):
            assert torch.equal(seq(x), want)
    assert all(int(b.seen) == 3 for b in blocks)
    stats = seq.offload.stats
    assert stats.compute_s > 0 and stats.transfer_s > 0
    assert [s.calls for s in stats.layers] == [3] * 5
    assert stats.peak_resident_bytes <= 2 * max(seq.offload.layouts[i].nbytes for i in range(5))
    assert "total" in str(stats) and stats.as_dict()["loads"] == stats.loads
    seq.offload.reset_stats()
    assert seq.offload.stats.loads == 0 and seq.offload.stats.compute_s == 0


def test_dtype_cast_from_source() -> None:
    ref = make_stack(2)
    blocks = copy.deepcopy(ref)
    wide = [{k: v.to(torch.float64) for k, v in b.state_dict().items()} for b in ref]
    off = offload(blocks, wide, "cpu")
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(blocks[1](blocks[0](x)), ref[1](ref[0](x)))
    off.remove()
