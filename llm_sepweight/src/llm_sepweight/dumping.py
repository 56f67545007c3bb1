"""0.10's module path of `dump` (`from llm_sepweight.dumping import dump`)."""

from llm_sepweight.compat import dump

__all__ = ["dump"]
