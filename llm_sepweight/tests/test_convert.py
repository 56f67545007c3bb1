from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from sw_helpers import tiny

from llm_sepweight import Checkpoint, VerifyError, convert, verify

convert_module = importlib.import_module("llm_sepweight.convert")


def _same(a: Path, b: Path) -> None:
    x, y = Checkpoint(a).load("f").to_dict(), Checkpoint(b).load("f").to_dict()
    assert sorted(x) == sorted(y)
    for k in x:
        assert torch.equal(x[k], y[k]), k


def _state_dict(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture
def llama(tmp_path: Path) -> Path:
    return tiny("llama")


def test_single_file_and_no_index_and_bin(llama: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    reference = convert(llama, tmp_path / "ref", progress=False)
    state = _state_dict(llama)
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(llama / "config.json", single)
    save_file(state, single / "model.safetensors")
    no_index = tmp_path / "no_index"
    shutil.copytree(llama, no_index)
    (no_index / "model.safetensors.index.json").unlink()
    assert len(list(no_index.glob("*.safetensors"))) > 1
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(llama / "config.json", binary)
    torch.save(state, binary / "pytorch_model.bin")
    for src in (single, no_index, binary):
        assert Checkpoint(src).kind == "hf"
        _same(Checkpoint(src).path, reference)
        out = convert(src, tmp_path / f"out_{src.name}", progress=False)
        verify(out)
        _same(out, reference)


def test_sharded_bin_with_index(llama: Path, tmp_path: Path) -> None:
    state = _state_dict(llama)
    src = tmp_path / "bin_sharded"
    src.mkdir()
    shutil.copy(llama / "config.json", src)
    keys = sorted(state)
    weight_map = {}
    for i, chunk in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: state[k] for k in chunk}, src / name)
        weight_map.update(dict.fromkeys(chunk, name))
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _same(convert(src, tmp_path / "out", progress=False), convert(llama, tmp_path / "ref", progress=False))


def test_interrupted_conversion_resumes_and_never_looks_complete(
    llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    real_write = convert_module._write_file
    calls = {"n": 0}

    def failing(path: Path, *args: object, **kwargs: object) -> dict:
        calls["n"] += 1
        if calls["n"] == 4:
            path.with_name(f".{path.name}.tmp").write_bytes(b"half a file")
            raise KeyboardInterrupt("simulated crash")
        return real_write(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(convert_module, "_write_file", failing)
    with pytest.raises(KeyboardInterrupt):
        convert(llama, out, progress=False)
    assert not (out / "manifest.json").exists()
    with pytest.raises(VerifyError):
        verify(out)
    with pytest.raises(ValueError, match="not a checkpoint"):
        Checkpoint(out)
    with pytest.raises(FileExistsError, match="unfinished"):
        convert(llama, out, dtype=torch.bfloat16, progress=False)  # another job into the same directory
    begin_stat = (out / "begin.safetensors").stat()
    monkeypatch.setattr(convert_module, "_write_file", real_write)
    written: list[str] = []
    monkeypatch.setattr(
        convert_module,
        "_write_file",
        lambda path, *a, **k: written.append(path.name) or real_write(path, *a, **k),
    )
    convert(llama, out, progress=False)
    assert "begin.safetensors" not in written and len(written) == 6 - 3  # 4 layers + begin + end, 3 done
    assert (out / "begin.safetensors").stat().st_mtime_ns == begin_stat.st_mtime_ns
    assert not list(out.glob(".*"))
    verify(out)
    _same(out, convert(llama, tmp_path / "ref", progress=False))


def test_existing_directories_are_not_overwritten(llama: Path, tmp_path: Path) -> None:
    out = convert(llama, tmp_path / "out", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert convert(llama, out, progress=False) == out  # the same job again: nothing to do
    with pytest.raises(FileExistsError, match="another source"):
        convert(tiny("qwen2"), out, progress=False)
    with pytest.raises(FileExistsError, match="another source"):
        convert(llama, out, dtype=torch.float16, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        convert(llama, foreign, progress=False)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def _decider(key: str) -> list[str]:
    # the decider of the llm_sepweight 0.10 README
    if key.startswith("model.layers."):
        parts = key.split(".")
        return ["mid", parts[2], ".".join(parts[3:])]
    if key.startswith("model.embed_tokens"):
        return ["start", key.removeprefix("model.")]
    return ["end", key.removeprefix("model.")]


def test_state_dict_and_pth_files_with_decider(llama: Path, tmp_path: Path) -> None:
    state = _state_dict(llama)
    reference = convert(llama, tmp_path / "ref", progress=False)
    out = convert(state, tmp_path / "sd", decider=_decider, progress=False)
    verify(out)
    _same(out, reference)
    half = sorted(state)
    torch.save({k: state[k] for k in half[:10]}, tmp_path / "a.pth")
    torch.save({k: state[k] for k in half[10:]}, tmp_path / "b.pth")
    out = convert(
        [tmp_path / "a.pth", tmp_path / "b.pth"], tmp_path / "pth", decider=_decider, progress=False
    )
    _same(out, reference)
    with pytest.raises(ValueError, match="decider"):
        convert(state, tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match=r"decider returned \['middle'"):
        convert(state, tmp_path / "y", decider=lambda k: ["middle", k], progress=False)


def test_gaps_in_layers_are_an_error(llama: Path, tmp_path: Path) -> None:
    state = {k: v for k, v in _state_dict(llama).items() if ".layers.2." not in k}
    with pytest.raises(ValueError, match=r"no tensors for layers \[2\]"):
        convert(state, tmp_path / "x", decider=_decider, config={"num_hidden_layers": 4}, progress=False)


def test_legacy_0_10_directory_loads_and_converts(llama: Path, tmp_path: Path) -> None:
    state = _state_dict(llama)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    # the layout 0.10's dump() wrote: begin.pth, mid.NNNNN.pth with "h.<i>." keys, end.pth
    torch.save({"embed_tokens.weight": state["model.embed_tokens.weight"]}, legacy / "begin.pth")
    for i in range(4):
        prefix = f"model.layers.{i}."
        layer = {f"h.{i}.{k[len(prefix) :]}": v for k, v in state.items() if k.startswith(prefix)}
        torch.save(layer, legacy / f"mid.{i:05d}.pth")
    torch.save(
        {"norm.weight": state["model.norm.weight"], "lm_head.weight": state["lm_head.weight"]},
        legacy / "end.pth",
    )
    ckpt = Checkpoint(legacy)
    assert ckpt.kind == "pth" and ckpt.num_layers == 4
    reference = Checkpoint(convert(llama, tmp_path / "ref", progress=False))
    assert sorted(ckpt.layer_state_dict(2)) == sorted(reference.layer_state_dict(2))
    out = convert(legacy, tmp_path / "new", progress=False)
    verify(out)
    a, b = Checkpoint(out).load("f").to_dict(), reference.load("f").to_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_tensor_data_is_aligned_for_memory_maps(smollm2_sepweight: Path) -> None:
    """Tensors used in place from a memory map sit on 64-byte boundaries, as allocated tensors do (MKL's gemv
    sums in another order on misaligned data, so a streamed layer would differ from a loaded one)."""
    from llm_sepweight.safetensors_file import Header

    files = sorted(Path(smollm2_sepweight).glob("*.safetensors"))
    assert files
    for f in files:
        header = Header.read(f)
        assert header.data_start % 64 == 0, f
        for name, t in header.tensors.items():
            if t.stop - t.start > 0 and (t.stop - t.start) % 64 == 0:
                assert t.start % 64 == 0, (f.name, name)
