from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sw_helpers import tiny

from llm_sepweight.cli import main


def _subprocess(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "llm_sepweight.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_cli_in_a_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    r = _subprocess("convert", str(tiny("llama-tied")), str(out), "--dtype", "bf16", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    r = _subprocess("verify", str(tmp_path))
    assert r.returncode == 1 and str(tmp_path) in r.stderr and "manifest.json" in r.stderr


def test_cli_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tiny("llama-tied")
    out = tmp_path / "sw"
    assert main(["convert", str(src), str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "sepweight" and info["num_layers"] == 4 and info["tied_embeddings"] is True
    assert main(["verify", str(out)]) == 0 and "OK" in capsys.readouterr().out
    assert main(["files", "b 0-2", str(out)]) == 0
    assert capsys.readouterr().out.split() == [
        "begin.safetensors",
        "mid.00000.safetensors",
        "mid.00001.safetensors",
    ]
    assert main(["files", "2-3 e"]) == 0
    assert capsys.readouterr().out.split() == ["mid.00002.safetensors", "end.safetensors"]
    assert main(["info", str(src)]) == 0 and "hf" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, expected",
    [
        (["files", "b 3-1"], "'3-1'"),
        (["files", "f"], "'f' needs a checkpoint path"),
        (["verify", "{tmp}/nothing"], "nothing"),
        (["convert", "{tmp}/none.gguf", "{tmp}/out"], "none.gguf"),
        (["info", "{tmp}"], "not a checkpoint directory"),
    ],
)
def test_cli_errors(
    args: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([a.replace("{tmp}", str(tmp_path)) for a in args]) == 1
    assert expected in capsys.readouterr().err


def test_cli_spec_outside_model_and_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["files", "0-9", str(tiny("llama"))]) == 1
    assert "'0-9'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["bogus"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["convert", "--help"])
    assert e.value.code == 0 and "--dtype" in capsys.readouterr().out
