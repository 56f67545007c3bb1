"""0.10's module path of `Part` (`from llm_sepweight.part_module import Part`)."""

from llm_sepweight.compat import Part

__all__ = ["Part"]
