"""The block schedule: many micro-batches, each layer loaded once per step for all of them."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from test_hf_parity import assert_same

from llm_offload import SepweightSource, offload

pytestmark = pytest.mark.timeout(120)

MICRO_BATCHES = [torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(i)) for i in range(4)]


def greedy(model: Any, ids: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Reference: one micro-batch, resident, prefill then greedy decode with its KV cache."""
    with torch.no_grad():
        out = model(ids, use_cache=True)
        logits, cache = [out.logits], out.past_key_values
        tokens = [ids]
        for _ in range(steps):
            tokens.append(logits[-1][:, -1:].argmax(-1))
            out = model(tokens[-1], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
    return logits, torch.cat(tokens, 1)


def test_blocks_equal_resident_prefill_and_decode(
    tiny_llama: Any, reference_llama: Any, tiny_llama_sepweight: Path
) -> None:
    steps = 3
    want = [greedy(reference_llama, ids, steps) for ids in MICRO_BATCHES]
    n_layers = len(tiny_llama.model.layers)
    off = offload(tiny_llama.model.layers, SepweightSource(tiny_llama_sepweight), "cpu", prefetch_depth=1)

    caches: list[Any] = [None] * len(MICRO_BATCHES)
    got: list[list[torch.Tensor]] = [[] for _ in MICRO_BATCHES]
    inputs = list(enumerate(MICRO_BATCHES))
    with torch.no_grad():
        for _step in range(steps + 1):
            off.reset_stats()

            def forward(job: tuple[int, torch.Tensor]) -> torch.Tensor:
                j, ids = job
                out = tiny_llama(ids, past_key_values=caches[j], use_cache=True)
                caches[j] = out.past_key_values
                return out.logits

            logits = off.run_blocks(inputs, forward)
            stats = off.stats
            # every micro-batch ran every layer; each layer came in once for all of them (plus the cyclic
            # prefetch of the next step's first layer)
            assert [s.calls for s in stats.layers] == [len(MICRO_BATCHES)] * n_layers
            assert stats.loads <= n_layers + 1
            for j, lg in enumerate(logits):
                got[j].append(lg)
            inputs = [(j, lg[:, -1:].argmax(-1)) for j, lg in enumerate(logits)]
    for j, (want_logits, _) in enumerate(want):
        assert_same(got[j], want_logits)
    off.remove()


def test_block_error_reaches_caller_and_offload_recovers(tiny_llama: Any, reference_llama: Any) -> None:
    layers = tiny_llama.model.layers
    state = [m.state_dict() for m in reference_llama.model.layers]
    off = offload(layers, lambda i: state[i], "cpu")
    attn = layers[1].self_attn
    original = attn.forward
    running: dict[int, int] = {}  # thread -> micro-batch

    def failing(*args: Any, **kwargs: Any) -> Any:
        if running.get(threading.get_ident()) == 2:
            raise ZeroDivisionError("micro-batch 2 broke")
        return original(*args, **kwargs)

    attn.forward = failing

    def fn(job: tuple[int, torch.Tensor]) -> torch.Tensor:
        running[threading.get_ident()] = job[0]
        return tiny_llama(job[1]).logits

    with torch.no_grad(), pytest.raises(ZeroDivisionError) as info:
        off.run_blocks(list(enumerate(MICRO_BATCHES)), fn)
    assert "offloaded layer 1" in "".join(getattr(info.value, "__notes__", []))
    assert not [t for t in threading.enumerate() if t.name.startswith("llm_offload-block")]
    assert all(s.users == 0 and s.layer is None for s in off.scheduler.slots)
    attn.forward = original
    with torch.no_grad():
        got = off.run_blocks(list(enumerate(MICRO_BATCHES)), fn)
        want = [reference_llama(ids).logits for ids in MICRO_BATCHES]
    assert_same(got, want)
    off.remove()
