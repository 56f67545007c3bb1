from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures

from llm_sepweight import convert


@pytest.fixture(scope="session")
def smollm2_hf() -> Path:
    return fixtures.real_checkpoint("smollm2")


@pytest.fixture(scope="session")
def gemma3_hf() -> Path:
    return fixtures.real_checkpoint("gemma3")


@pytest.fixture(scope="session")
def smollm2_sepweight(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(smollm2_hf, tmp_path_factory.mktemp("smollm2") / "sw", progress=False)


@pytest.fixture(scope="session")
def gemma3_sepweight(gemma3_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(gemma3_hf, tmp_path_factory.mktemp("gemma3") / "sw", progress=False)


@pytest.fixture(scope="session")
def smollm2_gguf_sepweight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(fixtures.smollm2_gguf(), tmp_path_factory.mktemp("smollm2_gguf") / "sw", progress=False)


@pytest.fixture(scope="session")
def gemma3_gguf_sepweight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(fixtures.gemma3_gguf(), tmp_path_factory.mktemp("gemma3_gguf") / "sw", progress=False)
