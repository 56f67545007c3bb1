"""Helpers for this package's tests (imported by name: conftest puts this folder on sys.path)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import fixtures
from tiny_configs import TINY_CONFIGS

__all__ = ["TINY_CONFIGS", "fixtures", "hf_positions", "left_padded"]


def left_padded(vocab: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids (B, max(lengths)) left-padded with 0, and the HF attention mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as transformers' generate makes them for a left-padded batch."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
