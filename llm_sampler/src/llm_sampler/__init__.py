"""llm_sampler"""

__version__ = "1.0.0"
