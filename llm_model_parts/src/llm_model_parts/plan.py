"""Deprecated alias of `llm_model_parts.pipeline.plan` (kept for one release; import from there or from `llm_model_parts.pipeline`)."""

import warnings

from llm_model_parts.pipeline.plan import (
    ModelSizes,
    activation_bytes,
    detect_memory,
    format_bytes,
    model_sizes,
    parse_bytes,
    plan_split,
)

warnings.warn(
    "llm_model_parts.plan is deprecated; import from llm_model_parts.pipeline.plan (or llm_model_parts.pipeline)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "ModelSizes",
    "activation_bytes",
    "detect_memory",
    "format_bytes",
    "model_sizes",
    "parse_bytes",
    "plan_split",
]
