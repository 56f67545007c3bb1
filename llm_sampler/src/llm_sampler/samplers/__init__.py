"""llama.cpp's samplers (DRY, XTC, top-nσ, mirostat, dynamic temperature) and transformers' top-H.

Each is a processor `(input_ids, scores) -> scores` like those in `llm_sampler.processors`, except mirostat,
which chooses the token itself and keeps a state per row (`Mirostat`).
"""

from llm_sampler.samplers.dry import DRY
from llm_sampler.samplers.dynatemp import DynamicTemperature
from llm_sampler.samplers.mirostat import Mirostat
from llm_sampler.samplers.top_h import TopH
from llm_sampler.samplers.top_n_sigma import TopNSigma
from llm_sampler.samplers.xtc import XTC

__all__ = ["DRY", "XTC", "DynamicTemperature", "Mirostat", "TopH", "TopNSigma"]
