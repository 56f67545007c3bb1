"""Backends: the CPU one, the CUDA one's argument checks (no GPU in CI), and slot layouts."""

from __future__ import annotations

import pytest
import torch

from llm_offload import CpuBackend, LayerLayout
from llm_offload.backend import ALIGN, packed_offsets, slot_view
from llm_offload.cuda import CudaBackend


def test_layout_aligns_every_tensor() -> None:
    layout = LayerLayout.pack(
        {"a": ((3,), torch.float32), "b": ((5, 7), torch.bfloat16), "c": ((1,), torch.int64)}
    )
    offsets = [t.offset for t in layout.tensors]
    assert offsets == [0, ALIGN, 2 * ALIGN] and layout.nbytes == 3 * ALIGN
    assert layout.data_bytes == 12 + 70 + 8


def test_slot_views_do_not_overlap() -> None:
    layout = LayerLayout.pack({"w": ((4, 4), torch.float32), "b": ((4,), torch.float16)})
    buf = torch.zeros(layout.nbytes, dtype=torch.uint8)
    views = {t.name: slot_view(buf, t.offset, t.shape, t.dtype) for t in layout.tensors}
    views["w"].fill_(1.0)
    views["b"].fill_(2.0)
    assert torch.equal(views["w"], torch.ones(4, 4)) and torch.equal(
        views["b"], torch.full((4,), 2.0, dtype=torch.float16)
    )
    assert views["w"].data_ptr() == buf.data_ptr()


def test_packed_offsets() -> None:
    staging = torch.zeros(1024, dtype=torch.uint8)
    host = {"x": staging[256:272].view(torch.float32), "y": staging[0:8].view(torch.float16)}
    assert packed_offsets(host, staging) == {"x": 256, "y": 0}
    assert packed_offsets({"z": torch.zeros(4)}, staging) is None


def test_cpu_backend_staging() -> None:
    b = CpuBackend()
    b.allocate(2, 64)
    assert b.staging(0, reads_into=True, zero_copy=True) is None  # a memory map needs no buffer
    buf = b.staging(1, reads_into=True, zero_copy=False)
    assert buf is not None and buf.numel() == 64
    assert b.staging(1, reads_into=True, zero_copy=False) is buf  # reused, not reallocated
    with pytest.raises(ValueError, match="runs on the CPU"):
        CpuBackend("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_backend_without_cuda() -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        CudaBackend("cuda")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        CudaBackend("cpu")
