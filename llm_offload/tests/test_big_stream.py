"""Layers streamed straight from Hugging Face shards (O_DIRECT, reused buffers), as the big-model benchmark
runs them, on the real small models: same greedy tokens and logits as the resident Part; and bad input."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any

import bigmodel
import fixtures
import pytest
import torch

from llm_offload import OffloadError, SepweightSource, sources

llm_model_parts = pytest.importorskip("llm_model_parts")
pytestmark = pytest.mark.timeout(300)

PROMPT = torch.tensor([[1, 504, 3458, 314, 4649, 28, 260]])


def greedy(part: Any, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    f = part.as_forward_func(max_seq_len=32)
    prompt = PROMPT % part.config.vocab_size  # the tiny models have 256 tokens
    with torch.inference_mode():
        logits = [f(prompt)[:, -1]]
        tokens = [int(logits[-1].argmax())]
        for _ in range(steps):
            logits.append(f(torch.tensor([[tokens[-1]]]))[:, -1])
            tokens.append(int(logits[-1].argmax()))
    return tokens, logits


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_streamed_from_hf_shards_equals_resident(name: str) -> None:
    path = fixtures.real_checkpoint(name)
    want_tokens, want_logits = greedy(llm_model_parts.load_part(path, "f"), 6)
    part, off = bigmodel.stream_part(path, dtype=torch.float32, prefetch_depth=2, direct=True)
    per_layer = off.source.plan(0).buffer_bytes
    off.remove()
    # a budget of 3 layers: the running one and two read ahead
    part, off = bigmodel.stream_part(path, dtype=torch.float32, max_resident_bytes=3 * per_layer, direct=True)
    assert off.resident == [] and off.scheduler is not None
    off.source.reset_bytes_read()
    got_tokens, got_logits = greedy(part, 6)
    assert got_tokens == want_tokens
    assert max(float((a - b).abs().max()) for a, b in zip(got_logits, want_logits, strict=True)) <= 1e-4
    layer_bytes = sum(off.source.plan(i).read_bytes for i in range(len(off.source)))
    # 7 passes over the layers; the cyclic read-ahead may have started the next pass's first layers
    assert (
        7 * layer_bytes
        <= off.source.bytes_read
        <= 7 * layer_bytes + 2 * max(off.source.plan(i).read_bytes for i in range(len(off.source)))
    )
    assert off.stats.peak_resident_bytes <= 3 * per_layer
    off.remove()


def test_bf16_storage_upcast_as_asked(tmp_path: Path) -> None:
    """A bf16 checkpoint feeding fp32 modules is upcast as each layer arrives; bf16 modules take it as is."""
    src = fixtures.tiny_checkpoint("qwen2")
    from transformers import AutoModelForCausalLM

    d = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(d, max_shard_size="20KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (Path(src) / f).exists():
            shutil.copy(Path(src) / f, d / f)
    ref = llm_model_parts.load_part(d, "f", dtype=torch.float32)
    part, off = bigmodel.stream_part(d, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in part.layers.parameters())
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.inference_mode():
        assert float((part(ids) - ref(ids)).abs().max()) <= 1e-5
    off.remove()
    part, off = bigmodel.stream_part(d)  # the stored dtype
    assert all(p.dtype == torch.bfloat16 for p in part.layers.parameters())
    with torch.inference_mode():
        assert part(ids).dtype == torch.bfloat16
    off.remove()


@pytest.fixture
def hf_copy(tmp_path: Path) -> Path:
    d = tmp_path / "hf"
    shutil.copytree(fixtures.tiny_checkpoint("llama"), d)
    return d


def _shard_of(d: Path, layer: int) -> Path:
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    return d / index[f"model.layers.{layer}.mlp.down_proj.weight"]


def test_budget_smaller_than_one_layer(hf_copy: Path) -> None:
    with pytest.raises(
        ValueError, match=r"offloaded layer 0 \(.*model-\d+-of-\d+\.safetensors\) needs \d+ bytes"
    ):
        bigmodel.stream_part(hf_copy, dtype=torch.float32, max_resident_bytes=1000)


def test_missing_shard(hf_copy: Path) -> None:
    part, off = bigmodel.stream_part(hf_copy, dtype=torch.float32, prefetch_depth=1)
    want, _ = greedy(part, 1)
    off.evict()
    shard = _shard_of(hf_copy, 2)
    shard.rename(hf_copy / "moved")
    with pytest.raises(OffloadError, match=rf"offloaded layer 2 .*{shard.name}") as info:
        greedy(part, 1)
    assert info.value.layer == 2
    (hf_copy / "moved").rename(shard)
    assert greedy(part, 1)[0] == want  # usable again
    off.remove()


def test_truncated_shard(hf_copy: Path) -> None:
    part, off = bigmodel.stream_part(hf_copy, dtype=torch.float32, prefetch_depth=1)
    want, _ = greedy(part, 1)
    off.evict()
    shard = _shard_of(hf_copy, 3)
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])
    with pytest.raises(OffloadError, match=rf"offloaded layer 3 .*{shard.name}.*truncated") as info:
        greedy(part, 1)
    assert info.value.layer == 3
    shard.write_bytes(good)
    assert greedy(part, 1)[0] == want
    off.remove()


def test_read_error_mid_pass(hf_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    part, off = bigmodel.stream_part(hf_copy, dtype=torch.float32, prefetch_depth=1)
    want, _ = greedy(part, 1)
    off.evict()
    bad = _shard_of(hf_copy, 2)
    real = sources._pread_into
    failed = []

    def flaky(fd: int, out: memoryview, offset: int) -> int:
        if Path(f"/proc/self/fd/{fd}").resolve() == bad.resolve() and not failed:
            failed.append(offset)
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, out, offset)

    monkeypatch.setattr(sources, "_pread_into", flaky)
    with pytest.raises(OffloadError, match=rf"offloaded layer \d .*{bad.name}.*read of bytes \d+-\d+ failed"):
        greedy(part, 1)
    assert failed
    assert greedy(part, 1)[0] == want  # the next call reads it again
    off.remove()


def test_direct_read_equals_buffered(hf_copy: Path) -> None:
    direct, buffered = SepweightSource(hf_copy, direct=True), SepweightSource(hf_copy)
    assert direct.reads_into and buffered.reads_into and not direct.zero_copy
    for i in range(len(direct)):
        a, b = direct.load(i), buffered.load(i)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    exact = sum(direct.plan(i).read_bytes for i in range(len(direct)))
    ranges = sum(len(direct.plan(i).ranges) for i in range(len(direct)))
    assert buffered.bytes_read == exact
    # O_DIRECT reads whole 4 KiB blocks: at most one more block at each end of each range
    assert exact <= direct.bytes_read <= exact + 2 * 4096 * ranges
