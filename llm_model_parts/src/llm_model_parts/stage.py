"""Deprecated alias of `llm_model_parts.pipeline.stage` (kept for one release; import from there or from `llm_model_parts.pipeline`)."""

import warnings

from llm_model_parts.pipeline.handshake import handshake
from llm_model_parts.pipeline.stage import (
    OUTPUTS,
    PartForward,
    Stage,
    StageForward,
    StageInfo,
    load_stage,
    stage_from_part,
)

PartCache = PartForward  # the name of earlier versions

warnings.warn(
    "llm_model_parts.stage is deprecated; import from llm_model_parts.pipeline.stage (or llm_model_parts.pipeline)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "OUTPUTS",
    "PartCache",
    "PartForward",
    "Stage",
    "StageForward",
    "StageInfo",
    "handshake",
    "load_stage",
    "stage_from_part",
]
