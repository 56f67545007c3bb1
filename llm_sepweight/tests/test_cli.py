from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sw_helpers import tiny


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", "import sys; from llm_sepweight.cli import main; sys.exit(main())", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_cli_convert_info_verify_files(tmp_path: Path) -> None:
    src = tiny("llama-tied")
    out = tmp_path / "sw"
    r = _cli("convert", str(src), str(out), "--dtype", "bf16", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    r = _cli("info", str(out), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["kind"] == "sepweight" and info["num_layers"] == 4 and info["tied_embeddings"] is True
    assert _cli("verify", str(out)).returncode == 0
    r = _cli("files", "b 0-2", str(out))
    assert r.stdout.split() == ["begin.safetensors", "mid.00000.safetensors", "mid.00001.safetensors"]
    assert _cli("files", "2-3 e").stdout.split() == ["mid.00002.safetensors", "end.safetensors"]
    r = _cli("info", str(src))
    assert r.returncode == 0 and "hf" in r.stdout


def test_cli_errors_and_help(tmp_path: Path) -> None:
    for cmd in ([], ["convert", "--help"], ["--help"]):
        r = _cli(*cmd)
        assert ("usage: llm-sepweight" in r.stdout + r.stderr) and r.returncode in (0, 2)
    r = _cli("verify", str(tmp_path))
    assert r.returncode == 1 and str(tmp_path) in r.stderr and "manifest.json" in r.stderr
    r = _cli("files", "b 3-1")
    assert r.returncode == 1 and "'3-1'" in r.stderr
    r = _cli("files", "0-9", str(tiny("llama")))
    assert r.returncode == 1 and "'0-9'" in r.stderr
    r = _cli("convert", str(tmp_path / "none.gguf"), str(tmp_path / "out"))
    assert r.returncode == 1 and "none.gguf" in r.stderr
    assert _cli("bogus").returncode == 2
