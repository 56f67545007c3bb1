"""`Checkpoint`: one view over a sepweight directory, an HF checkpoint directory, or a 0.10 `.pth` directory."""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from llm_sepweight import format as fmt
from llm_sepweight.materialize import materialize
from llm_sepweight.names import Location, num_layers_of, rule_for, split_names, tie_word_embeddings
from llm_sepweight.part_state_dict import PartStateDict
from llm_sepweight.safe_paths import inside
from llm_sepweight.safetensors_file import MappedFile, TensorInfo, read_header
from llm_sepweight.spec import PartSpec

logger = logging.getLogger(__name__)

Key = tuple[str, int | None]  # ("begin", None), ("mid", 3), ("end", None)


@dataclass(frozen=True)
class TensorRef:
    file: str  # relative to the checkpoint directory
    key: str  # the tensor's name inside that file
    name: str  # its name inside the part


_LEGACY_MID = re.compile(r"mid\.(\d+)\.pth")


class Checkpoint:
    """Weights of a model split in begin / layers / end, read from any supported directory without converting.

    `kind` is "sepweight" (a directory written by `convert`), "hf" (config.json + safetensors or
    pytorch_model*.bin, sharded or not) or "pth" (a directory of llm_sepweight 0.10).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such checkpoint directory")
        if not self.path.is_dir():
            hint = (
                "; convert a .gguf file first with llm_sepweight.convert"
                if self.path.suffix == ".gguf"
                else ""
            )
            raise NotADirectoryError(f"{self.path}: a checkpoint is a directory{hint}")
        self._files: dict[str, MappedFile | dict[str, torch.Tensor]] = {}
        self._manifest: dict[str, Any] | None = None
        if fmt.is_sepweight_dir(self.path):
            self.kind = "sepweight"
            self._manifest = fmt.read_manifest(self.path)
            self._config = dict(self._manifest["config"])
            self._refs = self._sepweight_refs(self._manifest)
        elif (self.path / "config.json").is_file():
            self.kind = "hf"
            self._config = _read_json(self.path / "config.json")
            self._refs = self._hf_refs()
        elif (self.path / "begin.pth").is_file() or any(self.path.glob("mid.*.pth")):
            self.kind = "pth"
            cfg = self.path / "config.json"
            self._config = _read_json(cfg) if cfg.is_file() else {}
            self._refs = self._legacy_refs()
        else:
            raise ValueError(
                f"{self.path}: not a checkpoint directory: expected manifest.json (sepweight), config.json "
                "with *.safetensors or pytorch_model*.bin (Hugging Face), or begin.pth/mid.*.pth (llm_sepweight 0.10)"
            )

    # --- description -------------------------------------------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        """The HF config.json, verbatim."""
        return self._config

    @property
    def manifest(self) -> dict[str, Any] | None:
        return self._manifest

    @property
    def architecture(self) -> str:
        if self._manifest is not None and self._manifest.get("architecture"):
            return str(self._manifest["architecture"])
        return str(self._config.get("model_type", ""))

    @cached_property
    def num_layers(self) -> int:
        if self._manifest is not None:
            return int(self._manifest["num_layers"])
        n = num_layers_of(self._config)
        if n is None:
            layers = [layer for _, layer in self._refs if layer is not None]
            n = max(layers) + 1 if layers else 0
        return n

    @property
    def tied_embeddings(self) -> bool:
        if self._manifest is not None:
            return bool(self._manifest.get("tied_embeddings", False))
        return self._tied

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, kind={self.kind!r}, architecture={self.architecture!r}, num_layers={self.num_layers})"

    def files(self, spec: str | PartSpec) -> list[str]:
        """The files (relative to `path`) that loading `spec` reads."""
        spec = PartSpec.coerce(spec).resolve(self.num_layers)
        seen: dict[str, None] = {}
        for key in _keys(spec):
            for ref in self._group(key):
                seen[ref.file] = None
        return list(seen)

    def tensor_names(self, section: str, layer: int | None = None) -> list[str]:
        return [ref.name for ref in self._group((section, layer))]

    # --- loading -----------------------------------------------------------------------------------------

    def load(
        self, spec: str | PartSpec, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> PartStateDict:
        """Load the sections of `spec` to `device`, floating tensors cast to `dtype` when given."""
        spec = PartSpec.coerce(spec).resolve(self.num_layers)
        out = PartStateDict()
        if spec.begin:
            out.begin = self._load_group(("begin", None), device, dtype)
        for i in spec.layers:
            out.mid[i] = self._load_group(("mid", i), device, dtype)
        if spec.end:
            out.end = self._load_group(("end", None), device, dtype)
        return out

    def layer_state_dict(
        self, i: int, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """The state dict of decoder layer `i` (names inside the layer)."""
        if not 0 <= i < self.num_layers:
            raise IndexError(f"{self.path}: layer {i} is outside the model (num_layers={self.num_layers})")
        return self._load_group(("mid", i), device, dtype)

    def verify(self) -> None:
        """Check sizes, SHA-256 and tensor shapes against the manifest (sepweight directories only)."""
        from llm_sepweight.verify import VerifyError, verify

        if self.kind != "sepweight":
            raise VerifyError(
                f"{self.path}: a {self.kind} checkpoint has no manifest to verify against; convert it first"
            )
        verify(self.path)

    def close(self) -> None:
        """Drop the memory maps (tensors already loaded stay valid: they hold their own reference)."""
        self._files.clear()

    def _group(self, key: Key) -> list[TensorRef]:
        refs = self._refs.get(key)
        if not refs:
            section, layer = key
            what = f"layer {layer}" if section == "mid" else section
            raise KeyError(f"{self.path}: no tensors for {what} in this {self.kind} checkpoint")
        return refs

    def _load_group(
        self, key: Key, device: str | torch.device, dtype: torch.dtype | None
    ) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[TensorRef]] = defaultdict(list)
        for ref in self._group(key):
            by_file[ref.file].append(ref)
        out: dict[str, torch.Tensor] = {}
        for file, refs in by_file.items():
            source = self._open(file)
            if isinstance(source, MappedFile):
                infos = [(ref.name, _info(source, ref, self.path)) for ref in refs]
                out.update(materialize(source, infos, torch.device(device), dtype))
            else:
                for ref in refs:
                    t = source[ref.key]
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    out[ref.name] = t.to(device)
        return out

    def _open(self, file: str) -> MappedFile | dict[str, torch.Tensor]:
        source = self._files.get(file)
        if source is None:
            path = inside(self.path, file, f"{self.path}: file", allow_hub_cache=self.kind == "hf")
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing weight file of checkpoint {self.path}")
            if file.endswith(".safetensors"):
                source = MappedFile(path)
                self._check_manifest_names(file, source.infos)
            else:
                source = _torch_load(path)
            self._files[file] = source
        return source

    def _check_manifest_names(self, file: str, infos: dict[str, TensorInfo]) -> None:
        if self._manifest is None:
            return
        listed = {t["name"] for t in self._manifest["files"][file]["tensors"]}
        if listed != set(infos):
            extra, missing = sorted(set(infos) - listed), sorted(listed - set(infos))
            raise fmt.ManifestError(
                f"{self.path / file}: tensors disagree with manifest.json (in file only: {extra[:3]}, "
                f"in manifest only: {missing[:3]}); run verify"
            )

    # --- indexing the directory --------------------------------------------------------------------------

    def _sepweight_refs(self, manifest: dict[str, Any]) -> dict[Key, list[TensorRef]]:
        refs: dict[Key, list[TensorRef]] = {}
        for file, entry in manifest["files"].items():
            key = _file_key(file)
            if key is None:
                raise fmt.ManifestError(f"{self.path / fmt.MANIFEST}: unexpected file name {file!r}")
            refs[key] = [TensorRef(file, t["name"], t["name"]) for t in entry["tensors"]]
        return refs

    def _hf_refs(self) -> dict[Key, list[TensorRef]]:
        weight_map = _hf_weight_map(self.path)
        locations = split_names(self.architecture, weight_map, num_layers_of(self._config))
        refs: dict[Key, list[TensorRef]] = defaultdict(list)
        for key_name, loc in locations.items():
            refs[(loc.section, loc.layer)].append(TensorRef(weight_map[key_name], key_name, loc.name))
        self._tied = self._add_tied_head(refs, locations, weight_map)
        return dict(refs)

    def _add_tied_head(
        self, refs: dict[Key, list[TensorRef]], locations: dict[str, Location], weight_map: dict[str, str]
    ) -> bool:
        if any(ref.name == "lm_head.weight" for ref in refs.get(("end", None), [])):
            return False
        embedding = rule_for(self.architecture, weight_map).embedding
        for key_name, loc in locations.items():
            if loc.section == "begin" and loc.name == embedding:
                if not tie_word_embeddings(self._config):
                    logger.warning(
                        "%s: no lm_head.weight and tie_word_embeddings=false; tying anyway", self.path
                    )
                refs[("end", None)].append(TensorRef(weight_map[key_name], key_name, "lm_head.weight"))
                return True
        return False

    def _legacy_refs(self) -> dict[Key, list[TensorRef]]:
        refs: dict[Key, list[TensorRef]] = {}
        files: list[tuple[Key, str]] = []
        for path in sorted(self.path.glob("*.pth")):
            m = _LEGACY_MID.fullmatch(path.name)
            if path.name in ("begin.pth", "end.pth"):
                files.append(((path.stem, None), path.name))
            elif m:
                files.append((("mid", int(m.group(1))), path.name))
        for key, file in files:
            state = self._open(file)
            assert isinstance(state, dict)
            prefix = f"h.{key[1]}."
            refs[key] = [TensorRef(file, k, k.removeprefix(prefix) if key[0] == "mid" else k) for k in state]
        self._tied = False
        return refs


def _keys(spec: PartSpec) -> list[Key]:
    keys: list[Key] = [("begin", None)] if spec.begin else []
    keys += [("mid", i) for i in spec.layers]
    keys += [("end", None)] if spec.end else []
    return keys


def _file_key(file: str) -> Key | None:
    if file == fmt.BEGIN_FILE:
        return ("begin", None)
    if file == fmt.END_FILE:
        return ("end", None)
    m = re.fullmatch(r"mid\.(\d+)\.safetensors", file)
    return ("mid", int(m.group(1))) if m else None


def _info(source: MappedFile, ref: TensorRef, root: Path) -> TensorInfo:
    try:
        return source.infos[ref.key]
    except KeyError:
        raise KeyError(f"{root / ref.file}: tensor {ref.key!r} is missing from the file") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return state


def _hf_weight_map(path: Path) -> dict[str, str]:
    """tensor name -> file, from the index or from the files' own headers (safetensors preferred, as HF does)."""
    for index_name, pattern in (
        ("model.safetensors.index.json", "*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model*.bin"),
    ):
        index = path / index_name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index}: expected a non-empty 'weight_map'")
            for key, file in weight_map.items():  # every name checked before any file is opened
                inside(path, file, f"{index}: weight_map[{key!r}]", allow_hub_cache=True)
            for file in sorted(set(weight_map.values())):
                if not (path / file).is_file():
                    raise FileNotFoundError(f"{path / file}: listed in {index_name} but missing")
            return {str(k): str(v) for k, v in weight_map.items()}
        files = sorted(p for p in path.glob(pattern) if not p.name.startswith("."))
        if files:
            weight_map = {}
            for file in files:
                inside(path, file.name, f"{path}: weight file", allow_hub_cache=True)
                names = read_header(file)[0] if file.suffix == ".safetensors" else _torch_load(file)
                weight_map.update(dict.fromkeys(names, file.name))
            return weight_map
    raise FileNotFoundError(f"{path}: has config.json but no *.safetensors or pytorch_model*.bin weights")


def load(
    path: str | Path,
    spec: str | PartSpec,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> PartStateDict:
    """`Checkpoint(path).load(spec, device, dtype)`."""
    return Checkpoint(path).load(spec, device=device, dtype=dtype)
