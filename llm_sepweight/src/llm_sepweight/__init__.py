"""llm_sepweight: per-layer weight directories for LLMs; convert, verify, and load exactly the part a node needs."""

from llm_sepweight.checkpoint import Checkpoint, load
from llm_sepweight.compat import Part, dump, get_filenames, is_cpu_memory_less_than_gpu, lazy_load
from llm_sepweight.convert import convert
from llm_sepweight.part_state_dict import PartStateDict
from llm_sepweight.spec import PartSpec
from llm_sepweight.verify import VerifyError, verify

__version__ = "1.0.0"

__all__ = [
    "Checkpoint",
    "Part",
    "PartSpec",
    "PartStateDict",
    "VerifyError",
    "__version__",
    "convert",
    "dump",
    "get_filenames",
    "is_cpu_memory_less_than_gpu",
    "lazy_load",
    "load",
    "verify",
]
