"""llm_offload"""

__version__ = "0.1.0"
