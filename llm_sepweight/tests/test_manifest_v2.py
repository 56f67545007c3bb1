"""Manifest version 2: every file of the directory covered, every field's type and bound checked."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sw_helpers import tiny

from llm_sepweight import Checkpoint, VerifyError, convert, load, verify
from llm_sepweight.format import JOURNAL, ManifestError, read_manifest
from llm_sepweight.manifest import validate_manifest
from llm_sepweight.verify import manifest_digest


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = Path(shutil.copytree(tiny("llama"), tmp_path_factory.mktemp("src") / "hf"))
    (src / "tokenizer.json").write_text('{"model": {"vocab": {}}}')
    (src / "tokenizer_config.json").write_text("{}")
    return convert(src, tmp_path_factory.mktemp("good") / "sw", progress=False)


@pytest.fixture
def copy(good: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "copy"))


def _manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / "manifest.json").read_text())


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_version_2_covers_every_file(good: Path) -> None:
    manifest = _manifest(good)
    assert manifest["version"] == 2
    listed = set(manifest["files"]) | set(manifest["other_files"]) | {"manifest.json"}
    assert listed == {p.name for p in good.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(
        manifest["other_files"]
    )
    for name, entry in manifest["other_files"].items():
        assert entry["sha256"] == hashlib.sha256((good / name).read_bytes()).hexdigest()
    assert verify(good) == []


@pytest.mark.parametrize(
    "name", ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
)
def test_every_byte_of_every_file(copy: Path, name: str) -> None:
    path = copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, size unchanged
    path.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match=rf"{name}: (SHA-256|not valid JSON|differs)"):
        verify(copy)


def test_edited_config_in_manifest_and_file(copy: Path) -> None:
    manifest = _manifest(copy)
    manifest["config"]["hidden_size"] = 12345
    _write_manifest(copy, manifest)
    with pytest.raises(VerifyError, match=r"config\.json: differs from the 'config' of manifest\.json"):
        verify(copy, hashes=False)


def test_unknown_files_fail_or_are_listed(copy: Path) -> None:
    (copy / "extra.bin").write_bytes(b"x")
    with pytest.raises(VerifyError, match=r"extra\.bin: not listed in manifest\.json"):
        verify(copy)
    assert verify(copy, unknown="list") == ["extra.bin"]
    (copy / "extra.bin").unlink()
    (copy / "subdir").mkdir()
    with pytest.raises(VerifyError, match="subdir"):
        verify(copy)


def test_a_directory_being_converted_never_verifies(copy: Path) -> None:
    (copy / JOURNAL).write_text("{}")
    with pytest.raises(VerifyError, match="unfinished"):
        verify(copy)


def test_manifest_pinned_by_its_digest(copy: Path) -> None:
    digest = manifest_digest(copy)
    verify(copy, manifest_sha256=digest)
    manifest = _manifest(copy)
    manifest["architecture"] = "other"
    _write_manifest(copy, manifest)
    with pytest.raises(VerifyError, match=r"manifest\.json: SHA-256 .* is not the expected"):
        verify(copy, manifest_sha256=digest)


def _rewrite_weight_file(copy: Path, name: str, header: dict[str, Any], data: bytes) -> None:
    """Replace a weight file and make the manifest agree on its size and hash (only the header is wrong)."""
    raw = json.dumps(header).encode()
    blob = struct.pack("<Q", len(raw)) + raw + data
    (copy / name).write_bytes(blob)
    manifest = _manifest(copy)
    entry = manifest["files"][name]
    entry["bytes"], entry["sha256"] = len(blob), hashlib.sha256(blob).hexdigest()
    entry["tensors"] = [
        {"name": k, "dtype": v["dtype"], "shape": v["shape"]}
        for k, v in header.items()
        if k != "__metadata__"
    ]
    _write_manifest(copy, manifest)


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            },
            8,
            "overlaps",
        ),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 12, "unaccounted trailing"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8, "unaccounted"),
        ({"a": {"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 8]}}, 8, "negative"),
    ],
    ids=["overlap", "trailing", "gap", "negative-dims"],
)
def test_verify_refuses_what_the_format_forbids(
    copy: Path, header: dict[str, Any], data: int, message: str
) -> None:
    with contextlib.suppress(ManifestError):  # a negative shape is already refused by the manifest's schema
        _rewrite_weight_file(copy, "mid.00002.safetensors", header, b"\0" * data)
    with pytest.raises(VerifyError, match=rf"mid\.00002\.safetensors.*{message}|shape"):
        verify(copy)


Mutation = Callable[[dict[str, Any]], None]
MUTATIONS: list[tuple[str, Mutation, str]] = [
    ("num_layers str", lambda m: m.update(num_layers="4"), "num_layers"),
    ("num_layers bool", lambda m: m.update(num_layers=True), "num_layers"),
    ("num_layers negative", lambda m: m.update(num_layers=-1), "num_layers"),
    ("num_layers huge", lambda m: m.update(num_layers=10**12), "num_layers"),
    ("num_layers too many", lambda m: m.update(num_layers=99_999), "does not list mid.00004"),
    ("num_layers too few", lambda m: m.update(num_layers=2), "lists layer 2"),
    ("files a list", lambda m: m.update(files=[]), "'files' must be dict"),
    ("config a list", lambda m: m.update(config=[]), "'config' must be dict"),
    ("architecture int", lambda m: m.update(architecture=3), "'architecture' must be str"),
    ("tied str", lambda m: m.update(tied_embeddings="yes"), "'tied_embeddings' must be bool"),
    ("source str", lambda m: m.update(source="hf"), "'source' must be an object"),
    ("version str", lambda m: m.update(version="2"), "version '2'"),
    ("version 3", lambda m: m.update(version=3), "version 3"),
    ("no other_files", lambda m: m.pop("other_files"), "other_files"),
    (
        "bytes str",
        lambda m: m["files"]["begin.safetensors"].update(bytes="1"),
        r"files\['begin.safetensors'\].*'bytes'",
    ),
    ("bytes negative", lambda m: m["other_files"]["config.json"].update(bytes=-1), r"config.json.*'bytes'"),
    (
        "sha256 short",
        lambda m: m["files"]["end.safetensors"].update(sha256="abc"),
        r"end.safetensors.*'sha256'",
    ),
    ("tensors dict", lambda m: m["files"]["end.safetensors"].update(tensors={}), "'tensors' must be a list"),
    ("tensor no name", lambda m: m["files"]["end.safetensors"]["tensors"].append({}), r"tensors\[\d+\]"),
    (
        "tensor bad dtype",
        lambda m: m["files"]["end.safetensors"]["tensors"][0].update(dtype="X"),
        "unknown dtype",
    ),
    (
        "tensor negative shape",
        lambda m: m["files"]["end.safetensors"]["tensors"][0].update(shape=[-1]),
        "non-negative",
    ),
    ("entry a list", lambda m: m["files"].update({"begin.safetensors": []}), "must be an object"),
    (
        "odd weight name",
        lambda m: m["files"].update({"weights.bin": {}}),
        "unexpected file name 'weights.bin'",
    ),
    (
        "duplicate layer",
        lambda m: m["files"].update({"mid.000001.safetensors": m["files"]["mid.00001.safetensors"]}),
        "num_layers|same layer",
    ),
    (
        "manifest in other_files",
        lambda m: m["other_files"].update({"manifest.json": m["other_files"]["config.json"]}),
        "cannot be listed",
    ),
    (
        "hidden other file",
        lambda m: m["other_files"].update({".sepweight-partial.json": m["other_files"]["config.json"]}),
        "cannot be listed",
    ),
]


@pytest.mark.parametrize(("case", "mutate", "message"), MUTATIONS, ids=[c for c, _, _ in MUTATIONS])
def test_malformed_manifest_names_the_field(copy: Path, case: str, mutate: Mutation, message: str) -> None:
    manifest = _manifest(copy)
    mutate(manifest)
    _write_manifest(copy, manifest)
    start = time.monotonic()
    with pytest.raises(ManifestError, match=message):
        read_manifest(copy)
    with pytest.raises(ManifestError, match=message):
        Checkpoint(copy)
    with pytest.raises(VerifyError, match=message):
        verify(copy)
    assert time.monotonic() - start < 5  # no loop or allocation over a hostile num_layers


def test_manifest_not_an_object_and_deep_json(copy: Path) -> None:
    for text in ("[]", "null", '"x"', "[" * 100_000 + "]" * 100_000):
        (copy / "manifest.json").write_text(text)
        with pytest.raises(ManifestError):
            read_manifest(copy)
    with pytest.raises(ManifestError, match="expected"):
        validate_manifest([], "m")


def test_version_1_directories_still_read(copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    manifest = _manifest(copy)
    manifest["version"] = 1
    del manifest["other_files"]
    manifest["source"].pop("fingerprint")
    _write_manifest(copy, manifest)
    ckpt = Checkpoint(copy)
    assert ckpt.num_layers == 4
    assert load(copy, "b 0-1").mid[0]
    uncovered = verify(copy)
    assert "config.json" in uncovered and "does not cover" in caplog.text


def test_cli_verify_lists_unknown(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llm_sepweight.cli import main

    (copy / "notes.txt").write_text("x")
    assert main(["verify", str(copy)]) == 1
    assert main(["verify", str(copy), "--list-unknown"]) == 0
    out = capsys.readouterr().out
    assert "notes.txt" in out and "OK" in out
    assert main(["verify", str(copy), "--list-unknown", "--manifest-sha256", manifest_digest(copy)]) == 0
    assert main(["verify", str(copy), "--list-unknown", "--manifest-sha256", "0" * 64]) == 1


def _paths(obj: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for k, v in items:
        out += _paths(v, (*path, k))
    return out


def test_mutated_manifests_raise_only_manifest_error(good: Path) -> None:
    import copy as copying
    import random

    base = _manifest(good)
    values: list[Any] = [
        None,
        True,
        -1,
        0,
        2**70,
        "x",
        "",
        [],
        {},
        [1],
        {"a": 1},
        1.5,
        "../x",
        "mid.00009.safetensors",
    ]
    paths = [p for p in _paths(base) if p]
    rng = random.Random(7)
    for _ in range(2000):
        manifest = copying.deepcopy(base)
        for _ in range(rng.randint(1, 3)):
            path = rng.choice(paths)
            obj: Any = manifest
            try:
                for k in path[:-1]:
                    obj = obj[k]
                if isinstance(obj, dict) and rng.random() < 0.2:
                    obj.pop(path[-1], None)
                else:
                    obj[path[-1]] = rng.choice(values)
            except (KeyError, IndexError, TypeError):
                pass
        with contextlib.suppress(ManifestError):
            validate_manifest(manifest, "m")
