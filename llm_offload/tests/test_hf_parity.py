"""Offloaded HF forwards equal the same layers run resident, exactly: prefill, and decode with a KV cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fake_backend import FakeDeviceBackend

from llm_offload import CpuSource, Offload, SepweightSource, move_resident, offload


def prefill_and_decode(model: Any, ids: torch.Tensor, steps: int = 3) -> list[torch.Tensor]:
    """Logits of a prefill and of `steps` greedy decode steps with the model's KV cache."""
    with torch.no_grad():
        out = model(ids, use_cache=True)
        logits, cache = [out.logits], out.past_key_values
        for _ in range(steps):
            nxt = logits[-1][:, -1:].argmax(-1)
            out = model(nxt, past_key_values=cache, use_cache=True)
            logits.append(out.logits)
    return logits


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g, w), (g - w).abs().max()


IDS = torch.tensor([[5, 17, 99, 3, 42, 7, 8, 200], [1, 2, 3, 4, 5, 6, 7, 8]])


@pytest.fixture(scope="module")
def want(reference_llama: Any) -> list[torch.Tensor]:
    return prefill_and_decode(reference_llama, IDS)


def layer_bytes(model: Any) -> int:
    return sum(p.nbytes for p in model.model.layers[0].parameters())


def test_cpu_source(tiny_llama: Any, want: list[torch.Tensor]) -> None:
    layers = tiny_llama.model.layers
    off = offload(layers, CpuSource.from_modules(layers), "cpu", prefetch_depth=2)
    assert all(p.device.type == "meta" for p in layers.parameters())
    assert_same(prefill_and_decode(tiny_llama, IDS), want)
    stats = off.stats
    assert [s.calls for s in stats.layers] == [4] * len(layers)
    assert stats.loads >= 4 * len(layers)
    assert stats.compute_s > 0
    off.remove()


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("depth", [0, 1, 3])
def test_sepweight_source(
    tiny_llama: Any, tiny_llama_sepweight: Path, want: list[torch.Tensor], mmap: bool, depth: int
) -> None:
    layers = tiny_llama.model.layers
    budget = (1 + depth) * (layer_bytes(tiny_llama) + 4096)
    off = offload(layers, SepweightSource(tiny_llama_sepweight, mmap=mmap), "cpu", prefetch_depth=depth,
                  max_resident_bytes=budget)  # fmt: skip
    assert_same(prefill_and_decode(tiny_llama, IDS), want)
    assert off.stats.peak_resident_bytes <= budget
    off.remove()


def test_callable_source_and_resident_layers(
    tiny_llama: Any, reference_llama: Any, want: list[torch.Tensor]
) -> None:
    layers = tiny_llama.model.layers
    state = [{k: v.clone() for k, v in m.state_dict().items()} for m in reference_llama.model.layers]
    calls: list[int] = []

    def load(i: int) -> dict[str, torch.Tensor]:
        calls.append(i)
        return state[i]

    off = offload(layers, load, "cpu", resident=[0, -1], prefetch_depth=1)
    assert calls[:2] == [0, 3]  # the resident ones, loaded once up front
    assert_same(prefill_and_decode(tiny_llama, IDS), want)
    assert set(calls[2:]) == {1, 2}  # only the streamed ones afterwards
    assert off.stats.layers[0].resident and off.stats.layers[0].loads == 0
    off.remove()


def test_auto_resident_fits_budget(tiny_llama: Any, want: list[torch.Tensor]) -> None:
    layers = tiny_llama.model.layers
    one = layer_bytes(tiny_llama)  # every tensor of the tiny layer is a multiple of the 256-byte alignment
    source = CpuSource.from_modules(layers)
    off = offload(layers, source, "cpu", prefetch_depth=1, max_resident_bytes=3 * one + 100,
                  resident="auto")  # fmt: skip
    assert off.resident == [0]  # two slots for streaming (depth 1), the first layer kept with what is left
    assert_same(prefill_and_decode(tiny_llama, IDS), want)
    assert off.stats.layers[1].loads > 0 and off.stats.layers[0].loads == 0
    off.remove()
    off = offload(layers, source, "cpu", prefetch_depth=1, max_resident_bytes=4 * one + 100)  # "auto" default
    assert off.resident == [0, 1, 2, 3] and off.scheduler is None  # all fit: nothing streams
    assert_same(prefill_and_decode(tiny_llama, IDS), want)
    assert all(s.loads == 0 and s.calls > 0 for s in off.stats.layers)
    off.remove()


def test_preallocated_slots_with_deferred_copies(
    tiny_llama: Any, tiny_llama_sepweight: Path, want: list[torch.Tensor]
) -> None:
    """The CUDA scheduling (slots reused, copies that land only when the compute waits) on the CPU."""
    backend = FakeDeviceBackend()
    layers = tiny_llama.model.layers
    off = Offload(layers, SepweightSource(tiny_llama_sepweight), "cpu", prefetch_depth=1, backend=backend)
    assert len(backend.slots) == 2 and backend.allocations == 1
    assert_same(prefill_and_decode(tiny_llama, IDS), want)
    assert_same(prefill_and_decode(tiny_llama, IDS), want)
    assert backend.violations == []
    assert backend.allocations == 1  # slots allocated once, reused for every layer
    off.remove()


def test_remove_materialize(tiny_llama: Any, tiny_llama_sepweight: Path, want: list[torch.Tensor]) -> None:
    layers = tiny_llama.model.layers
    off = offload(layers, SepweightSource(tiny_llama_sepweight), "cpu")
    assert_same(prefill_and_decode(tiny_llama, IDS), want)
    off.remove(materialize=True)
    assert not layers[0]._forward_pre_hooks
    assert all(p.device.type == "cpu" for p in layers.parameters())
    assert_same(prefill_and_decode(tiny_llama, IDS), want)


def test_generate_and_move_resident(
    tiny_llama: Any, reference_llama: Any, tiny_llama_sepweight: Path
) -> None:
    layers = tiny_llama.model.layers
    off = offload(
        layers,
        SepweightSource(tiny_llama_sepweight),
        "cpu",
        max_resident_bytes=3 * layer_bytes(tiny_llama) + 4096,
    )
    move_resident(tiny_llama, "cpu")  # a no-op on CPU, and it must not touch the meta weights
    assert all(p.device.type == "meta" for p in layers.parameters())
    with torch.no_grad():
        got = tiny_llama.generate(IDS, max_new_tokens=6, do_sample=False)
        want = reference_llama.generate(IDS, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
    off.remove()
