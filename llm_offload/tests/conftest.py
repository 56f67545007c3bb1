"""Fixtures for llm_offload's tests: tiny random HF models and their sepweight directories."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures

torch.set_num_threads(2)


def load_hf(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_llama_path() -> Path:
    return Path(fixtures.tiny_checkpoint("llama"))


@pytest.fixture(scope="session")
def reference_llama(tiny_llama_path: Path) -> Any:
    return load_hf(tiny_llama_path)


@pytest.fixture
def tiny_llama(reference_llama: Any) -> Any:
    """A fresh copy per test: offloading changes the model it is given."""
    return copy.deepcopy(reference_llama)


@pytest.fixture(scope="session")
def tiny_llama_sepweight(tiny_llama_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llm_sepweight import convert

    return Path(convert(tiny_llama_path, tmp_path_factory.mktemp("sw") / "llama", progress=False))
