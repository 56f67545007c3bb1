"""Resuming trusts nothing: the journal fingerprints the source, finished files are re-hashed, no stale state stays."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from sw_helpers import tiny

from llm_sepweight import VerifyError, convert, load, verify
from llm_sepweight.format import JOURNAL

convert_module = importlib.import_module("llm_sepweight.convert")


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny("llama"), tmp_path / "src"))


def _interrupt(monkeypatch: pytest.MonkeyPatch, after_files: int) -> list[str]:
    """Make `_write_file` raise after `after_files` files; returns the names written (after undo too)."""
    real = convert_module._write_file
    written: list[str] = []

    def failing(path: Path, *args: object, **kwargs: object) -> dict:
        if len(written) == after_files:
            raise KeyboardInterrupt("simulated crash")
        written.append(path.name)
        return real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(convert_module, "_write_file", failing)
    return written


def _change_values(src: Path) -> None:
    for shard in sorted(src.glob("*.safetensors")):
        tensors = {k: v + 1 for k, v in load_file(shard).items()}
        save_file(tensors, shard, metadata={"format": "pt"})


def _weights(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob("*.safetensors"))}


def test_source_changed_during_an_interruption_restarts(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    written = _interrupt(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        convert(src, out, progress=False)
    assert len(written) == 3
    _change_values(src)  # the same path, the same names and shapes, other values
    monkeypatch.undo()
    convert(src, out, progress=False)
    assert "source changed" in caplog.text and "safetensors: " in caplog.text  # names the file
    verify(out)
    reference = convert(Path(shutil.copytree(src, tmp_path / "src2")), tmp_path / "ref", progress=False)
    assert _weights(out) == _weights(reference)  # the new model only, not a mix


def test_finished_directory_of_a_changed_source_is_not_overwritten(src: Path, tmp_path: Path) -> None:
    out = convert(src, tmp_path / "out", progress=False)
    assert convert(src, out, progress=False) == out  # unchanged: a no-op
    _change_values(src)
    with pytest.raises(FileExistsError, match="before it changed"):
        convert(src, out, progress=False)
    verify(out)


def test_a_corrupted_finished_file_is_rewritten_on_resume(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    _interrupt(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        convert(src, out, progress=False)
    monkeypatch.undo()
    begin = out / "begin.safetensors"
    data = bytearray(begin.read_bytes())
    data[-1] ^= 0xFF  # same size: only the hash tells
    begin.write_bytes(bytes(data))
    written = _interrupt(monkeypatch, 99)
    convert(src, out, progress=False)
    assert "begin.safetensors" in written and "mid.00000.safetensors" not in written
    verify(out)


def test_killed_after_the_manifest(src: Path, tmp_path: Path) -> None:
    out = convert(src, tmp_path / "out", progress=False)
    ref = {p.name: p.read_bytes() for p in out.iterdir()}
    source = json.loads((out / "manifest.json").read_text())["source"]
    fingerprint = source.pop("fingerprint")
    (out / JOURNAL).write_text(json.dumps({"source": source, "dtype": None, "fingerprint": fingerprint}))
    with pytest.raises(VerifyError, match="unfinished"):
        verify(out)
    convert(src, out, progress=False)  # finishes the job: the journal goes, nothing else changes
    assert {p.name: p.read_bytes() for p in out.iterdir()} == ref
    verify(out)


def test_no_window_between_the_directory_and_its_journal(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    import llm_sepweight.journal as journal

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("killed before the journal")

    monkeypatch.setattr(journal, "write_journal", crash)
    with pytest.raises(KeyboardInterrupt):
        convert(src, out, progress=False)
    assert not out.exists()  # the directory appears only with its journal in it
    stale = tmp_path / f".{out.name}.sepweight-new-x"
    stale.mkdir()  # what a SIGKILL at that point would leave (the exception path removes its own)
    monkeypatch.undo()
    convert(src, out, progress=False)
    verify(out)
    assert not stale.exists()


def test_unreadable_journal_restarts(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    _interrupt(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        convert(src, out, progress=False)
    monkeypatch.undo()
    (out / JOURNAL).write_text("{garbage")
    convert(src, out, progress=False)
    verify(out)


def test_state_dict_sources_never_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = {
        "embed.weight": torch.randn(4, 2),
        "layers.0.w": torch.randn(2, 2),
        "layers.1.w": torch.randn(2, 2),
    }

    def decider(key: str) -> list[str]:
        if key.startswith("layers."):
            return ["mid", key.split(".")[1], "w"]
        return ["start", key]

    out = tmp_path / "out"
    _interrupt(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        convert(state, out, decider=decider, progress=False)
    monkeypatch.undo()
    state = {k: v + 1 for k, v in state.items()}  # another state dict, same names and shapes
    written = _interrupt(monkeypatch, 99)
    convert(state, out, decider=decider, progress=False)
    assert len(written) == 3  # everything rewritten
    assert torch.equal(load(out, "0-1").mid[0]["w"], state["layers.0.w"])
