"""0.10's memory check: is the free CPU memory smaller than the GPU's (then load with `lazy_load`)."""

from __future__ import annotations

import torch

_GIB = 1024**3


def get_cpu_memory() -> float:
    """Available CPU memory in GiB (`MemAvailable` of /proc/meminfo; 0 where there is none)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / (1024**2)
    except OSError:
        pass
    return 0.0


def get_gpu_memory(device: str | torch.device) -> float:
    """Total memory of the CUDA device `device` (`"cuda:0"`, `"cuda"`) in GiB."""
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available. No GPU detected.")
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"is_cpu_memory_less_than_gpu: {str(device)!r} is not a CUDA device")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if not 0 <= index < torch.cuda.device_count():
        raise ValueError(f"Invalid CUDA device index {index} ({torch.cuda.device_count()} devices)")
    return torch.cuda.get_device_properties(index).total_memory / _GIB


def is_cpu_memory_less_than_gpu(device: str | torch.device) -> bool:
    """True when the available CPU memory is smaller than the total memory of `device`."""
    return get_cpu_memory() < get_gpu_memory(device)
