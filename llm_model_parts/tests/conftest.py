"""Puts this folder on sys.path (for parts_testlib); seeds torch and runs it on one thread per test."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(autouse=True)
def _deterministic_single_thread() -> Iterator[None]:
    # Tiny models gain nothing from a second thread, and on a shared 2-core machine an OpenMP team waiting
    # for a descheduled thread makes each small op take milliseconds. Restored for other packages' tests.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
