"""What `convert` reads: a list of tensors known by name, dtype and shape, each read only when written."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm_sepweight.names import Location
from llm_sepweight.safe_paths import inside
from llm_sepweight.safetensors_file import read_header, read_tensor

logger = logging.getLogger(__name__)

Decider = Callable[[str], Sequence[str] | None]

# Files an HF checkpoint directory carries beside its weights that a standalone directory should keep.
_COPIED_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
_NOT_COPIED = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", "manifest.json"}


@dataclass
class SourceTensor:
    name: str  # the HF name (or the key given to a decider)
    dtype: torch.dtype
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]
    location: Location | None = None  # set by sources that know it (decider, 0.10 directories)


@dataclass
class Source:
    kind: str  # "hf" | "gguf" | "pth" | "state_dict"
    name: str
    config: dict[str, Any]
    tensors: list[SourceTensor]
    extra_files: dict[str, bytes | Path] = field(default_factory=dict)  # file name -> content or file to copy
    files: list[Path] = field(default_factory=list)  # the source files (their identity makes resuming safe)


def hf_source(path: Path) -> Source:
    from llm_sepweight.checkpoint import _hf_weight_map, _read_json, _torch_load

    config = _read_json(path / "config.json")
    weight_map = _hf_weight_map(path)
    tensors: list[SourceTensor] = []
    for file in sorted(set(weight_map.values())):
        names = {k for k, v in weight_map.items() if v == file}
        if file.endswith(".safetensors"):
            infos = read_header(path / file)[0]
            for name in sorted(names):
                if name not in infos:
                    raise KeyError(
                        f"{path / file}: tensor {name!r} listed in the index is missing from the file"
                    )
                info = infos[name]
                tensors.append(
                    SourceTensor(name, info.dtype, info.shape, _safetensors_reader(path / file, info))
                )
        else:
            state = _torch_load(path / file)
            for name in sorted(names):
                if name not in state:
                    raise KeyError(
                        f"{path / file}: tensor {name!r} listed in the index is missing from the file"
                    )
                t = state[name]
                tensors.append(SourceTensor(name, t.dtype, tuple(t.shape), _constant(t)))
    extra: dict[str, bytes | Path] = {
        p.name: inside(path, p.name, f"{path}: file to copy", allow_hub_cache=True)
        for p in sorted(path.iterdir())
        if p.is_file()
        and p.suffix in _COPIED_SUFFIXES
        and p.name not in _NOT_COPIED
        and not p.name.startswith(".")
    }
    files = [path / "config.json", *(path / f for f in set(weight_map.values())), *extra.values()]
    files += [
        p
        for p in (path / "model.safetensors.index.json", path / "pytorch_model.bin.index.json")
        if p.is_file()
    ]
    return Source(
        "hf", str(path.resolve()), config, tensors, extra, [p for p in files if isinstance(p, Path)]
    )


def state_dict_source(
    state_dict: Mapping[str, torch.Tensor], decider: Decider, config: dict[str, Any] | None, name: str
) -> Source:
    tensors = []
    for key, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {key!r} is a {type(t).__name__}, expected a tensor")
        loc = decide(decider, key)
        if loc is not None:
            tensors.append(SourceTensor(key, t.dtype, tuple(t.shape), _constant(t), loc))
    return Source("state_dict", name, dict(config or {}), tensors)


def pth_source(paths: list[Path], decider: Decider, config: dict[str, Any] | None) -> Source:
    from llm_sepweight.checkpoint import _torch_load

    tensors: list[SourceTensor] = []
    for path in paths:
        part = state_dict_source(_torch_load(path), decider, None, str(path))
        tensors += part.tensors
    return Source(
        "pth", ",".join(str(p.resolve()) for p in paths), dict(config or {}), tensors, {}, list(paths)
    )


def legacy_dir_source(path: Path) -> Source:
    """A directory of llm_sepweight 0.10 (`begin.pth`, `mid.NNNNN.pth`, `end.pth`)."""
    from llm_sepweight.checkpoint import Checkpoint

    ckpt = Checkpoint(path)
    tensors = []
    for (section, layer), refs in sorted(ckpt._refs.items(), key=lambda kv: _order(kv[0])):
        for ref in refs:
            state = ckpt._open(ref.file)
            assert isinstance(state, dict)
            t = state[ref.key]
            loc = Location(section, layer, ref.name)  # type: ignore[arg-type]
            tensors.append(SourceTensor(f"{ref.file}:{ref.key}", t.dtype, tuple(t.shape), _constant(t), loc))
    extra: dict[str, bytes | Path] = {
        p.name: p for p in sorted(path.iterdir()) if p.is_file() and p.suffix in _COPIED_SUFFIXES
    }
    extra.pop("config.json", None)
    files = sorted(
        p for p in path.iterdir() if p.is_file() and (p.suffix == ".pth" or p.suffix in _COPIED_SUFFIXES)
    )
    return Source("pth", str(path.resolve()), ckpt.config, tensors, extra, files)


def decide(decider: Decider, key: str) -> Location | None:
    """Apply a 0.10 decider: `key -> ["start"|"begin", name] | ["mid", "<layer>", name] | ["end", name]`."""
    goal = decider(key)
    if goal is None or (isinstance(goal, Sequence) and len(goal) == 0):
        logger.info("decider skipped %r", key)
        return None
    goal = [str(g) for g in goal]
    section = {"start": "begin", "begin": "begin", "mid": "mid", "end": "end"}.get(goal[0])
    if section == "mid" and len(goal) >= 3 and goal[1].isdigit():
        return Location("mid", int(goal[1]), ".".join(goal[2:]))
    if section in ("begin", "end") and len(goal) >= 2:
        return Location(section, None, ".".join(goal[1:]))  # type: ignore[arg-type]
    raise ValueError(
        f"decider returned {goal!r} for {key!r}; expected ['start', name], ['mid', '<layer>', name] or ['end', name]"
    )


def _order(key: tuple[str, int | None]) -> tuple[int, int]:
    return ({"begin": 0, "mid": 1, "end": 2}[key[0]], key[1] or 0)


def _constant(t: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: t


def _safetensors_reader(path: Path, info: Any) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        with open(path, "rb") as f:
            return read_tensor(f, info)

    return read
