"""The incremental forward_func: rewind, reset, overflow, growth, packed prefix trees, swapped weights."""

from __future__ import annotations

import pytest
import torch
from parts_testlib import fixtures

from llm_model_parts import CacheOverflowError, chain, load_part

TOL = 1e-4


@pytest.fixture(scope="module", params=["llama", "gemma3_text", "mistral"])
def part(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    return load_part(fixtures.tiny_checkpoint(request.param), "f")


def test_rewind_then_continue_equals_straight_run(part) -> None:  # type: ignore[no-untyped-def]
    ids = torch.randint(3, 256, (2, 15))
    f = part.as_forward_func()
    straight = torch.cat([f(ids[:, :10]), f(ids[:, 10:])], dim=1)
    f.reset()
    f(ids[:, :10])
    f(torch.randint(3, 256, (2, 4)))  # a speculative branch, then thrown away
    assert f.seq_len == 14
    f.rewind(4)
    assert f.seq_len == 10
    torch.testing.assert_close(f(ids[:, 10:]), straight[:, 10:], atol=TOL, rtol=0)
    f.reset()
    assert f.seq_len == 0
    torch.testing.assert_close(f(ids), straight, atol=TOL, rtol=0)


def test_cache_overflow_and_growth(part) -> None:  # type: ignore[no-untyped-def]
    ids = torch.randint(3, 256, (1, 250))
    part.drop_cache()
    with torch.inference_mode():
        ref = part(ids)  # stateless
    f = part.as_forward_func(max_seq_len=300)
    out = torch.cat([f(ids[:, :200]), f(ids[:, 200:])], dim=1)  # grows past the first 256-slot allocation
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    with pytest.raises(CacheOverflowError, match="max_seq_len=300"):
        f(torch.randint(3, 256, (1, 51)))
    part.setup_cache(1, 8)
    part(ids[:, :8])
    with pytest.raises(CacheOverflowError, match="max_seq_len=8"):
        part(ids[:, :1])
    part.drop_cache()


def test_a_new_forward_func_starts_a_new_sequence(part) -> None:  # type: ignore[no-untyped-def]
    ids = torch.randint(3, 256, (1, 9))
    first = part.as_forward_func(max_seq_len=16)
    ref = first(ids)
    first(ids[:, :5])  # 14 of 16 slots used
    second = part.as_forward_func(max_seq_len=16)  # same part, same cache buffers
    torch.testing.assert_close(second(ids), ref, atol=TOL, rtol=0)
    assert second.seq_len == 9


def test_batch_size_fixed_until_reset(part) -> None:  # type: ignore[no-untyped-def]
    f = part.as_forward_func()
    f(torch.randint(3, 256, (2, 5)))
    with pytest.raises(ValueError, match="reset"):
        f(torch.randint(3, 256, (3, 1)))
    f.reset()
    assert f(torch.randint(3, 256, (3, 4))).shape == (3, 4, 256)


def test_forward_packed_equals_separate_continuations(part) -> None:  # type: ignore[no-untyped-def]
    """All options after one shared context in one call, against one cached forward per option."""
    f = part.as_forward_func()
    context = torch.randint(3, 256, (1, 11))
    options = [torch.randint(3, 256, (1, n)) for n in (3, 1, 5, 2)]
    f(context)
    separate = []
    for option in options:
        separate.append(f(option)[0])
        f.rewind(option.shape[1])
    ids = torch.cat(options, dim=1)
    n = ids.shape[1]
    positions = torch.cat([torch.arange(o.shape[1]) for o in options]) + context.shape[1]
    tree = torch.zeros(n, n, dtype=torch.bool)
    start = 0
    for option in options:
        stop = start + option.shape[1]
        tree[start:stop, start:stop] = torch.ones(stop - start, stop - start, dtype=torch.bool).tril()
        start = stop
    packed = f.forward_packed(ids, positions[None], tree[None])
    torch.testing.assert_close(packed[0], torch.cat(separate), atol=TOL, rtol=0)
    assert f.seq_len == context.shape[1]  # the cache is left as it was
    nxt = torch.randint(3, 256, (1, 3))
    after = f(nxt)
    f.reset()
    torch.testing.assert_close(after, f(torch.cat([context, nxt], dim=1))[:, -3:], atol=TOL, rtol=0)


def test_forward_packed_with_padded_batch_uses_row_zero() -> None:
    part = load_part(fixtures.tiny_checkpoint("qwen3"), "f")
    f = part.as_forward_func()
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    ids = torch.randint(3, 256, (2, 6))
    f(ids, attention_mask=mask)
    option = torch.randint(3, 256, (1, 3))
    packed = f.forward_packed(
        option, torch.arange(4, 7)[None], torch.ones(3, 3, dtype=torch.bool).tril()[None]
    )
    f.reset()
    single = f(torch.cat([ids[:1, 2:], option], dim=1))[:, -3:]
    torch.testing.assert_close(packed, single, atol=TOL, rtol=0)


def test_chain_forward_packed_and_rewind() -> None:
    path = fixtures.tiny_checkpoint("phi3")
    full = load_part(path, "f").as_forward_func()
    parts = chain([load_part(path, s) for s in ("b 0-2", "2-3", "3-4 e")]).as_forward_func()
    ids = torch.randint(3, 256, (1, 9))
    torch.testing.assert_close(parts(ids), full(ids), atol=TOL, rtol=0)
    tree = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)[None]
    packed_ids, positions = torch.tensor([[5, 6, 7]]), torch.tensor([[9, 10, 9]])
    torch.testing.assert_close(
        parts.forward_packed(packed_ids, positions, tree),
        full.forward_packed(packed_ids, positions, tree),
        atol=TOL,
        rtol=0,
    )
    parts.rewind(3)
    full.rewind(3)
    torch.testing.assert_close(parts(ids[:, -3:]), full(ids[:, -3:]), atol=TOL, rtol=0)


def test_layers_work_with_swapped_parameters() -> None:
    """llm_offload swaps a layer's parameters between calls: the layer must read them at call time."""
    path = fixtures.tiny_checkpoint("llama")
    part = load_part(path, "f")
    ids = torch.randint(3, 256, (1, 7))
    with torch.inference_mode():
        ref = part(ids)
        layer = part.layers[1]
        saved = {k: v.clone() for k, v in layer.state_dict().items()}
        layer.load_state_dict({k: torch.zeros_like(v) for k, v in saved.items()}, assign=True)
        changed = part(ids)
        layer.load_state_dict(saved, assign=True)
        again = part(ids)
    assert not torch.allclose(changed, ref)
    torch.testing.assert_close(again, ref, atol=0, rtol=0)
    assert isinstance(part.layers, torch.nn.ModuleList) and len(part.layers) == 4
