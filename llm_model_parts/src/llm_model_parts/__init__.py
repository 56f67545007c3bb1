"""llm_model_parts: standalone part models (begin / layers i..j / end) equal to transformers, with KV caches."""

from llm_model_parts.cache import CacheOverflowError, KVCache
from llm_model_parts.chain import Chain, chain
from llm_model_parts.config import ModelConfig, RopeParameters
from llm_model_parts.families import supported_architectures
from llm_model_parts.forward_func import IncrementalForward
from llm_model_parts.part import Part, load_part
from llm_model_parts.pipeline import (
    PipelineDriver,
    PipelineError,
    PipelineTimeout,
    RemoteError,
    Stage,
    StageInfo,
    plan_split,
    run_worker,
    start_pipeline,
)

__version__ = "0.1.0"

__all__ = [
    "CacheOverflowError",
    "Chain",
    "IncrementalForward",
    "KVCache",
    "ModelConfig",
    "Part",
    "PipelineDriver",
    "PipelineError",
    "PipelineTimeout",
    "RemoteError",
    "RopeParameters",
    "Stage",
    "StageInfo",
    "__version__",
    "chain",
    "load_part",
    "plan_split",
    "run_worker",
    "start_pipeline",
    "supported_architectures",
]
