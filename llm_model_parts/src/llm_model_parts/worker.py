"""Deprecated alias of `llm_model_parts.pipeline.worker` (kept for one release; import from there or from `llm_model_parts.pipeline`)."""

import warnings

from llm_model_parts.pipeline.worker import (
    run_worker,
)

warnings.warn(
    "llm_model_parts.worker is deprecated; import from llm_model_parts.pipeline.worker (or llm_model_parts.pipeline)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "run_worker",
]
