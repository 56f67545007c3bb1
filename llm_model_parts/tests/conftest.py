"""Puts this folder on sys.path (for parts_testlib) and seeds torch for every test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Tiny models gain nothing from a second thread, and on a shared 2-core machine an OpenMP team waiting
# for a descheduled thread makes each small op take milliseconds.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
