"""llm_model_parts"""

__version__ = "0.1.0"
