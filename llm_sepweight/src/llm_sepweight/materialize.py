"""Turn tensors of a mapped file into tensors on the target device and dtype, with as few copies as possible.

CPU: zero-copy views of the map (the page cache is the memory), cast only when asked.
Other devices: the file's byte span is copied once into pinned host memory, sent with one non-blocking
copy, and the tensors are views of that device buffer (cast there, on the device).
"""

from __future__ import annotations

import torch

from llm_sepweight.safetensors_file import MappedFile, TensorInfo

# Send the file's span in one copy when the tensors asked for cover most of it.
_MIN_COVERAGE = 0.8


def materialize(
    source: MappedFile, infos: list[tuple[str, TensorInfo]], device: torch.device, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        out = {}
        for name, info in infos:
            t = source.tensor(info)
            if dtype is not None and t.dtype != dtype and t.is_floating_point():
                t = t.to(dtype)
            out[name] = t
        return out
    return bulk_transfer(source, infos, device, dtype, pin=torch.cuda.is_available())


def bulk_transfer(
    source: MappedFile,
    infos: list[tuple[str, TensorInfo]],
    device: torch.device,
    dtype: torch.dtype | None,
    pin: bool,
) -> dict[str, torch.Tensor]:
    """One staged host->device copy of the span holding `infos`, then per-tensor views on the device."""
    if not infos:
        return {}
    lo = min(info.start for _, info in infos)
    hi = max(info.stop for _, info in infos)
    wanted = sum(info.nbytes for _, info in infos)
    aligned = all((info.start - lo) % info.dtype.itemsize == 0 for _, info in infos)
    if not aligned or wanted < _MIN_COVERAGE * (hi - lo):
        return _per_tensor(source, infos, device, dtype, pin)
    staging = torch.empty(hi - lo, dtype=torch.uint8, pin_memory=pin)
    staging.copy_(source.raw(lo, hi))
    buffer = staging.to(device, non_blocking=pin)
    out = {}
    for name, info in infos:
        t = buffer[info.start - lo : info.stop - lo].view(info.dtype).view(info.shape)
        out[name] = _cast(t, dtype)
    return out


def _per_tensor(
    source: MappedFile,
    infos: list[tuple[str, TensorInfo]],
    device: torch.device,
    dtype: torch.dtype | None,
    pin: bool,
) -> dict[str, torch.Tensor]:
    out = {}
    for name, info in infos:
        t = source.tensor(info)
        if pin:
            t = t.pin_memory()
        out[name] = _cast(t.to(device, non_blocking=pin), dtype)
    return out


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and t.dtype != dtype and t.is_floating_point():
        return t.to(dtype)
    return t
