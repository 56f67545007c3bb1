"""Sources: sepweight files read directly (header parsing, mmap, read into a buffer), HF dirs, CPU dicts."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from llm_offload import CpuSource, SepweightSource
from llm_offload.sources import SafetensorsHeader, as_source


@pytest.mark.parametrize("mode", ["mmap", "read", "into"])
def test_sepweight_layers_equal_safetensors(tiny_llama_sepweight: Path, mode: str) -> None:
    src = SepweightSource(tiny_llama_sepweight, mmap=mode == "mmap")
    assert len(src) == 4 and src.zero_copy == (mode == "mmap")
    for i in range(4):
        want = load_file(tiny_llama_sepweight / f"mid.{i:05d}.safetensors")
        into = torch.empty(src.layer_nbytes(i) or 0, dtype=torch.uint8) if mode == "into" else None
        got = src.load(i, into=into)
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k
        if into is not None:
            assert all(into.data_ptr() <= t.data_ptr() < into.data_ptr() + into.numel() for t in got.values())


def test_layers_pick_a_range(tiny_llama_sepweight: Path) -> None:
    src = SepweightSource(tiny_llama_sepweight, layers=range(2, 4))
    assert len(src) == 2 and src.file(0).name == "mid.00002.safetensors"
    with pytest.raises(IndexError, match="serves 2 layers, no layer 2"):
        src.load(2)
    with pytest.raises(ValueError, match=r"has layers 0..3, not \[7\]"):
        SepweightSource(tiny_llama_sepweight, layers=[7])


def test_dtype_cast(tiny_llama_sepweight: Path) -> None:
    src = SepweightSource(tiny_llama_sepweight, dtype=torch.bfloat16)
    assert not src.zero_copy
    assert all(t.dtype == torch.bfloat16 for t in src.load(0).values())


def test_hf_directory_through_llm_sepweight(tiny_llama_path: Path, tiny_llama_sepweight: Path) -> None:
    src = SepweightSource(tiny_llama_path)  # read straight from the HF shards, by byte range
    assert src.reads_into and not src.zero_copy and len(src) == 4
    want = load_file(tiny_llama_sepweight / "mid.00001.safetensors")
    got = src.load(1)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        SepweightSource(tmp_path / "nope")


BAD_OFFSETS = b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'  # no data follows
BAD_DTYPE = b'{"a": {"dtype": "F31", "shape": [2], "data_offsets": [0, 8]}}'


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"\x01", "truncated safetensors file"),
        (struct.pack("<Q", 10**12) + b"{}", "exceeds the 100000000-byte limit"),
        (struct.pack("<Q", 4) + b"{{{{", "corrupted safetensors header"),
        (struct.pack("<Q", 2) + b"[]", "corrupted safetensors header"),
        (
            struct.pack("<Q", len(BAD_OFFSETS)) + BAD_OFFSETS,
            "tensor 'a' ends at byte 77 but the file has 69 bytes",
        ),
        (struct.pack("<Q", len(BAD_DTYPE)) + BAD_DTYPE, "bad header entry"),
        # accepted by the reader of earlier versions, refused as the safetensors library refuses it
        (struct.pack("<Q", len(BAD_OFFSETS)) + BAD_OFFSETS + bytes(12), "unaccounted trailing bytes"),
    ],
)
def test_corrupt_headers(tmp_path: Path, payload: bytes, match: str) -> None:
    f = tmp_path / "mid.00000.safetensors"
    f.write_bytes(payload)
    with pytest.raises(ValueError, match=match):
        SafetensorsHeader(f)


def test_cpu_source(reference_llama: Any) -> None:
    layers = reference_llama.model.layers
    src = CpuSource.from_modules(layers)
    assert src.pinned == torch.cuda.is_available()
    assert len(src) == 4 and src.layer_nbytes(0) == sum(p.nbytes for p in layers[0].parameters())
    with pytest.raises(IndexError, match="holds 4 layers, no layer 4"):
        src.load(4)
    with pytest.raises(TypeError, match="layer 0 tensor 'w' is a int"):
        CpuSource([{"w": 3}])  # type: ignore[dict-item]


def test_as_source() -> None:
    assert as_source([{"w": torch.zeros(1)}]).load(0)["w"].shape == (1,)
    assert as_source(lambda i: {"i": torch.tensor(i)}).load(3)["i"] == 3
    with pytest.raises(TypeError, match="source must be"):
        as_source("weights.safetensors")


def test_hf_layers_land_aligned_in_read_buffers(tiny_llama_path: Path) -> None:
    """An HF shard's data starts 8 bytes past a boundary; read without O_DIRECT, a layer's tensors still land
    64-byte aligned in the buffer (as allocated tensors do), so their kernels sum in the same order."""
    plan = SepweightSource(tiny_llama_path).plan(0)
    assert all(begin % 64 == 0 for _, _, begin, _ in plan.tensors.values())
    direct = SepweightSource(tiny_llama_path, direct=True).plan(0)
    assert all(r.offset % 4096 == r.start % 4096 for r in direct.ranges)  # O_DIRECT's placement
