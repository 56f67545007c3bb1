"""0.10's module path of `load` and `lazy_load` (`from llm_sepweight.loading import load`)."""

from llm_sepweight.checkpoint import load
from llm_sepweight.compat import lazy_load

__all__ = ["lazy_load", "load"]
