"""Deprecated alias of `llm_model_parts.pipeline.transport` (kept for one release; import from there or from `llm_model_parts.pipeline`)."""

import warnings

from llm_model_parts.pipeline.transport import (
    HEADER_LEN,
    MAGIC,
    MAX_DIMS,
    MAX_PAYLOADS,
    TAG_DOWN,
    TAG_RETURN,
    VERSION,
    Command,
    Header,
    Link,
    PipelineError,
    PipelineTimeout,
    RemoteError,
    decode_json,
    decode_text,
    encode_json,
    encode_text,
)

warnings.warn(
    "llm_model_parts.transport is deprecated; import from llm_model_parts.pipeline.transport (or llm_model_parts.pipeline)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "HEADER_LEN",
    "MAGIC",
    "MAX_DIMS",
    "MAX_PAYLOADS",
    "TAG_DOWN",
    "TAG_RETURN",
    "VERSION",
    "Command",
    "Header",
    "Link",
    "PipelineError",
    "PipelineTimeout",
    "RemoteError",
    "decode_json",
    "decode_text",
    "encode_json",
    "encode_text",
]
