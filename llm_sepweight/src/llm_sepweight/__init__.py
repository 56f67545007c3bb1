"""llm_sepweight"""

__version__ = "1.0.0"
