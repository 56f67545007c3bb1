"""llm_sampler: sampling, generation and closed-form scoring for any forward_func(input_ids) -> logits."""

from llm_sampler.closed_form import TextEncoder, score, score_many, score_texts
from llm_sampler.config import SamplingConfig
from llm_sampler.generate import Generation, Step, generate, sample, sample_steps
from llm_sampler.hf import IncrementalHF
from llm_sampler.scores import OptionScore, Scores

__version__ = "1.0.0"

__all__ = [
    "Generation",
    "IncrementalHF",
    "OptionScore",
    "SamplingConfig",
    "Scores",
    "Step",
    "TextEncoder",
    "generate",
    "sample",
    "sample_steps",
    "score",
    "score_many",
    "score_texts",
]
