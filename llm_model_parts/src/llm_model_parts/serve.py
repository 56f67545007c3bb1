"""The torchrun launcher: `torchrun --nproc-per-node 3 -m llm_model_parts.serve --model DIR --plan auto ...`.

A thin entry point kept at this path (the documented command); the launcher lives in
`llm_model_parts.pipeline.serve` (also runnable as `python -m llm_model_parts.pipeline.serve`).
"""

import sys

from llm_model_parts.pipeline.serve import build_parser, generate, main

__all__ = ["build_parser", "generate", "main"]

if __name__ == "__main__":
    sys.exit(main())
