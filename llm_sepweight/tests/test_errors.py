from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from sw_helpers import tiny

from llm_sepweight import Checkpoint, VerifyError, convert, load, verify
from llm_sepweight.format import ManifestError
from llm_sepweight.safetensors_file import SafetensorsError


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(tiny("llama"), tmp_path_factory.mktemp("good") / "sw", progress=False)


@pytest.fixture
def copy(good: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "copy"))


def test_good_directory_verifies(good: Path) -> None:
    verify(good)
    Checkpoint(good).verify()


def test_flipped_byte_fails_the_hash(copy: Path) -> None:
    path = copy / "mid.00002.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    verify(copy, hashes=False)  # sizes and headers still agree
    with pytest.raises(VerifyError, match=r"mid\.00002\.safetensors: SHA-256"):
        verify(copy)


def test_truncated_file(copy: Path) -> None:
    path = copy / "mid.00001.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(VerifyError, match=r"mid\.00001\.safetensors: \d+ bytes, the manifest says"):
        verify(copy)
    with pytest.raises(SafetensorsError, match=r"mid\.00001\.safetensors: truncated: tensor '.*'"):
        load(copy, "1-2")
    path.write_bytes(b"\x01")
    with pytest.raises(SafetensorsError, match="no header"):
        Checkpoint(copy).layer_state_dict(1)


def test_corrupted_header(copy: Path) -> None:
    path = copy / "begin.safetensors"
    data = bytearray(path.read_bytes())
    data[10:14] = b"\xff\xfe{}"
    path.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match=r"begin\.safetensors: corrupted safetensors header"):
        verify(copy)
    with pytest.raises(SafetensorsError, match=r"begin\.safetensors"):
        load(copy, "b")


def test_missing_file(copy: Path) -> None:
    (copy / "end.safetensors").unlink()
    with pytest.raises(VerifyError, match=r"end\.safetensors: missing"):
        verify(copy)
    with pytest.raises(FileNotFoundError, match=r"end\.safetensors"):
        load(copy, "3-4 e")
    load(copy, "b 0-4")  # the parts that are there still load


def test_manifest_disagrees_with_files(copy: Path) -> None:
    manifest = json.loads((copy / "manifest.json").read_text())
    entry = manifest["files"]["mid.00003.safetensors"]
    entry["tensors"][0]["shape"] = [1, 2, 3]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    name = entry["tensors"][0]["name"]
    with pytest.raises(VerifyError, match=rf"mid\.00003\.safetensors: tensor '{name}' is F32 \["):
        verify(copy)
    entry["tensors"].append({"name": "extra.weight", "dtype": "F32", "shape": [1]})
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"mid\.00003\.safetensors: tensors disagree with manifest.json"):
        load(copy, "3-4")
    del manifest["files"]["mid.00000.safetensors"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VerifyError, match=r"does not list mid\.00000\.safetensors"):
        verify(copy)


def test_bad_manifest(copy: Path) -> None:
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match=r"manifest\.json: not valid JSON"):
        Checkpoint(copy)
    with pytest.raises(VerifyError, match=r"manifest\.json"):
        verify(copy)
    (copy / "manifest.json").write_text(json.dumps({"format": "sepweight", "version": 99}))
    with pytest.raises(ManifestError, match="version 99"):
        Checkpoint(copy)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        Checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        Checkpoint(tmp_path / "empty")
    with pytest.raises(ValueError, match="cannot convert"):
        convert(tmp_path / "empty", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        Checkpoint(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="no such file"):
        convert(tmp_path / "missing.gguf", tmp_path / "out", progress=False)


def test_missing_shard_of_an_hf_directory(tmp_path: Path) -> None:
    src = Path(shutil.copytree(tiny("llama"), tmp_path / "hf"))
    shard = sorted(src.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        Checkpoint(src)
    with pytest.raises(FileNotFoundError, match=shard.name):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_spec_outside_the_model(good: Path) -> None:
    with pytest.raises(ValueError, match="'2-9'"):
        load(good, "2-9 e")
    with pytest.raises(ValueError, match="'x'"):
        Checkpoint(good).files("b x")


def test_verify_an_hf_directory_says_convert_first() -> None:
    with pytest.raises(VerifyError, match="convert it first"):
        Checkpoint(tiny("llama")).verify()
