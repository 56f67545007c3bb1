"""llm_offload: stream a model's layers onto a device just in time, prefetching ahead in execution order."""

from .backend import Backend, LayerLayout, TensorSpec
from .cpu import CpuBackend
from .offload import Offload, OffloadedSequential, move_resident, offload
from .scheduler import OffloadError, Scheduler
from .sources import CallableSource, CpuSource, SepweightSource, Source
from .stats import LayerStats, OffloadStats

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "CallableSource",
    "CpuBackend",
    "CpuSource",
    "LayerLayout",
    "LayerStats",
    "Offload",
    "OffloadError",
    "OffloadStats",
    "OffloadedSequential",
    "Scheduler",
    "SepweightSource",
    "Source",
    "TensorSpec",
    "move_resident",
    "offload",
]
