"""Fixtures for llm_sampler's tests: tiny random HF models, the real SmolLM2, and reference forward_funcs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures

torch.set_num_threads(1)  # tiny models: one thread avoids OpenMP spin-waits on a busy machine


from sampler_testlib import load_hf  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama() -> Any:
    return load_hf(fixtures.tiny_checkpoint("llama"))


@pytest.fixture(scope="session")
def tiny_draft() -> Any:
    return load_hf(fixtures.tiny_checkpoint("llama-tied"))


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return Path(fixtures.real_checkpoint("smollm2"))


@pytest.fixture(scope="session")
def smollm2(smollm2_path: Path) -> Any:
    return load_hf(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)
