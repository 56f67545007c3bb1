"""llm_sampler: sampling, generation and closed-form scoring for any forward_func(input_ids) -> logits."""

from llm_sampler import processors
from llm_sampler.batch import RowToken, SamplingRow, sample_rows
from llm_sampler.beam import BeamOutput, beam_search
from llm_sampler.closed_form import TextEncoder, score, score_many, score_texts
from llm_sampler.compat import (
    best_continuation_naive,
    create_batch_with_continuations,
    get_scores_of_continuations,
    sample_gpt_fast,
    sample_huggingface,
)
from llm_sampler.config import SamplingConfig
from llm_sampler.generate import Generation, Step, generate, sample, sample_steps
from llm_sampler.hf import IncrementalHF
from llm_sampler.scores import OptionScore, Scores
from llm_sampler.select import TokenSelector
from llm_sampler.speculative import prompt_lookup, speculative_generate, speculative_sample
from llm_sampler.stream import TextStreamer

__version__ = "1.0.0"

__all__ = [
    "BeamOutput",
    "Generation",
    "IncrementalHF",
    "OptionScore",
    "RowToken",
    "SamplingConfig",
    "SamplingRow",
    "Scores",
    "Step",
    "TextEncoder",
    "TextStreamer",
    "TokenSelector",
    "beam_search",
    "best_continuation_naive",
    "create_batch_with_continuations",
    "generate",
    "get_scores_of_continuations",
    "processors",
    "prompt_lookup",
    "sample",
    "sample_gpt_fast",
    "sample_huggingface",
    "sample_rows",
    "sample_steps",
    "score",
    "score_many",
    "score_texts",
    "speculative_generate",
    "speculative_sample",
]
