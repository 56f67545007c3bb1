"""0.10's module path of `get_filenames` (`from llm_sepweight.filenames import get_filenames`)."""

from llm_sepweight.compat import get_filenames

__all__ = ["get_filenames"]
