"""0.10's `convert_safetensors_files`: a directory of `.safetensors` files into one sepweight directory."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from llm_sepweight.convert import convert
from llm_sepweight.safetensors_file import SafetensorsFile
from llm_sepweight.sources import Decider

logger = logging.getLogger(__name__)


def convert_safetensors_files(in_path: str | Path, out_path: str | Path, decider: Decider) -> Path:
    """Convert every `*.safetensors` file of `in_path`, sections chosen by the 0.10 `decider`.

    The tensors are zero-copy views of each file's memory map (0.10 cloned each file into memory), so the
    conversion holds one tensor at a time beside the page cache.
    """
    in_dir = Path(in_path)
    if not in_dir.is_dir():
        raise NotADirectoryError(
            f"{in_dir}: convert_safetensors_files needs a directory of .safetensors files"
        )
    files = sorted(p for p in in_dir.glob("*.safetensors") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{in_dir}: no *.safetensors files to convert")
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for path in files:
        logger.info("reading %s", path)
        with SafetensorsFile(path) as f:
            for name in f.tensors:
                if name in state:
                    raise ValueError(f"{path}: tensor {name!r} is also in {origin[name]}")
                state[name], origin[name] = f.tensor(name), path
    return convert(state, out_path, decider=decider, progress=False)
