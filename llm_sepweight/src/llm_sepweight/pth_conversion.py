"""0.10's `convert_pth_files`: a directory of `.pth` or `.bin` state dicts into one sepweight directory."""

from __future__ import annotations

import logging
from pathlib import Path

from llm_sepweight.convert import convert
from llm_sepweight.sources import Decider

logger = logging.getLogger(__name__)


def convert_pth_files(
    in_path: str | Path, out_path: str | Path, decider: Decider, extension: str = "pth"
) -> Path:
    """Convert every `*.<extension>` file of `in_path` (`"pth"` or `"bin"`, with or without the dot).

    All files go into one conversion (0.10 called `dump` once per file into the same directory); every file
    is read with `torch.load(weights_only=True)`.
    """
    in_dir = Path(in_path)
    suffix = extension.lstrip(".")
    if not in_dir.is_dir():
        raise NotADirectoryError(f"{in_dir}: convert_pth_files needs a directory of .{suffix} files")
    files = sorted(p for p in in_dir.glob(f"*.{suffix}") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{in_dir}: no *.{suffix} files to convert")
    logger.info("converting %d .%s files of %s", len(files), suffix, in_dir)
    return convert(list(files), out_path, decider=decider, progress=False)
