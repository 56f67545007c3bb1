"""File names read from a manifest or an HF index never reach outside their directory, and are refused before any open."""

from __future__ import annotations

import builtins
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from sw_helpers import tiny

from llm_sepweight import Checkpoint, VerifyError, convert, verify
from llm_sepweight.format import ManifestError
from llm_sepweight.safe_paths import UnsafePathError, inside, plain_file_name

BAD_NAMES = [
    "../outside.safetensors",
    "/etc/passwd",
    "sub/model.safetensors",
    "..",
    ".",
    "",
    "a\\b",
    "a\x00b",
]


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(tiny("llama"), tmp_path_factory.mktemp("good") / "sw", progress=False)


@pytest.fixture
def copy(good: Path, tmp_path: Path) -> Path:
    (tmp_path / "outside.safetensors").write_bytes(b"secret")
    return Path(shutil.copytree(good, tmp_path / "copy"))


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path opened through builtins.open while the test runs."""
    seen: list[str] = []
    real = builtins.open

    def spy(file: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    return seen


@pytest.mark.parametrize("name", BAD_NAMES)
def test_plain_file_name(name: str) -> None:
    with pytest.raises(UnsafePathError, match="where"):
        plain_file_name(name, "where")


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/x.json"])
@pytest.mark.parametrize("key", ["files", "other_files"])
def test_manifest_entry_outside_the_directory(copy: Path, name: str, key: str, opened: list[str]) -> None:
    manifest = json.loads((copy / "manifest.json").read_text())
    entry = {"bytes": 6, "sha256": "0" * 64}
    if key == "files":
        entry["tensors"] = []
    manifest[key][name] = entry
    (copy / "manifest.json").write_text(json.dumps(manifest))
    opened.clear()
    with pytest.raises(VerifyError, match=rf"{key}.*{name!r}".replace("/", ".").replace("[", ".")):
        verify(copy)
    with pytest.raises(ManifestError, match="plain file name"):
        Checkpoint(copy)
    assert all(Path(p).name == "manifest.json" for p in opened), opened


def test_symlink_out_of_a_sepweight_directory(copy: Path) -> None:
    target = copy.parent / "elsewhere.safetensors"
    shutil.move(copy / "mid.00001.safetensors", target)
    os.symlink(target, copy / "mid.00001.safetensors")
    with pytest.raises(VerifyError, match=r"mid\.00001\.safetensors.*symlink.*outside"):
        verify(copy)
    with pytest.raises(UnsafePathError, match="outside"):
        Checkpoint(copy).load("1-2")
    os.unlink(copy / "mid.00001.safetensors")
    os.symlink(target, copy / "mid.00001.safetensors")


def _hf_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny("llama"), tmp_path / "hf"))


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors", ".."])
def test_hf_index_naming_a_file_outside(tmp_path: Path, name: str, opened: list[str]) -> None:
    src = _hf_copy(tmp_path)
    (tmp_path / "outside.safetensors").write_bytes(b"secret")
    (src / "sub").mkdir()
    index = json.loads((src / "model.safetensors.index.json").read_text())
    key = sorted(index["weight_map"])[0]
    index["weight_map"][key] = name
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    opened.clear()
    with pytest.raises(UnsafePathError, match=rf"weight_map\['{key}'\]"):
        Checkpoint(src)
    with pytest.raises(UnsafePathError, match=rf"weight_map\['{key}'\]"):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not any("outside" in p or "passwd" in p or "/sub/" in p for p in opened), opened


def test_hf_symlinks(tmp_path: Path) -> None:
    src = _hf_copy(tmp_path)
    shard = sorted(src.glob("*.safetensors"))[0]
    elsewhere = tmp_path / "elsewhere" / shard.name
    elsewhere.parent.mkdir()
    shutil.move(shard, elsewhere)
    os.symlink(elsewhere, shard)
    with pytest.raises(UnsafePathError, match=rf"{shard.name}.*outside"):
        Checkpoint(src)
    # the Hugging Face hub cache: snapshots/<rev>/file -> ../../blobs/<hash>, accepted for HF directories
    repo = tmp_path / "models--x--y"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    for p in tiny("llama").iterdir():
        blob = repo / "blobs" / f"blob-{p.name}"
        shutil.copy(p, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / p.name)
    ckpt = Checkpoint(snapshot)
    assert ckpt.load("b 0-1").mid[0]
    out = convert(snapshot, tmp_path / "from-cache", progress=False)
    verify(out)
    assert inside(snapshot, "config.json", "x", allow_hub_cache=True)
    with pytest.raises(UnsafePathError):
        inside(snapshot, "config.json", "x")
