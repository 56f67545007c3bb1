"""Conversion streams: its peak memory is bounded by one output file plus a constant, not the model size.

The default model is small (CI); `LLM_SEPWEIGHT_RSS_MB=4000` runs the same check on a 4 GB checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from llm_sepweight.safetensors_file import StreamWriter

_CHILD = r"""
import sys, json
from pathlib import Path
from llm_sepweight import convert

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])

src, out, warm = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
convert(warm / "tiny", warm / "tiny-out", progress=False)  # import and run everything once
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS:")
convert(src, out, progress=False)
print(json.dumps({"before_kb": before, "after_kb": status("VmHWM:")}))
"""


def _write_model(path: Path, layers: int, layer_mb: float) -> int:
    """A llama-named single-file checkpoint of `layers` layers written tensor by tensor; returns its size."""
    path.mkdir()
    hidden = 256
    rows = max(1, int(layer_mb * 2**20 / 4 / hidden / 2))
    entries = [
        ("model.embed_tokens.weight", torch.float32, (rows, hidden)),
        ("model.norm.weight", torch.float32, (hidden,)),
    ]
    for i in range(layers):
        for name in ("mlp.up_proj.weight", "mlp.down_proj.weight"):
            entries.append((f"model.layers.{i}.{name}", torch.float32, (rows, hidden)))
    with open(path / "model.safetensors", "wb") as f:
        writer = StreamWriter(f, entries)
        shapes = {n: s for n, _, s in entries}
        writer.write_all((n, torch.full(shapes[n], 0.5)) for n in writer.order)
    config = {"model_type": "llama", "num_hidden_layers": layers, "tie_word_embeddings": False}
    (path / "config.json").write_text(json.dumps(config))
    return (path / "model.safetensors").stat().st_size


def test_peak_memory_is_bounded_by_one_file(tmp_path: Path) -> None:
    total_mb = float(os.environ.get("LLM_SEPWEIGHT_RSS_MB", "160"))
    layers = 24
    layer_mb = total_mb / (layers + 1)
    size = _write_model(tmp_path / "big", layers, layer_mb)
    _write_model(tmp_path / "tiny", 2, 0.1)
    r = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path / "big"), str(tmp_path / "out"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert r.returncode == 0, r.stderr
    rss = json.loads(r.stdout.strip().splitlines()[-1])
    grown_mb = (rss["after_kb"] - rss["before_kb"]) / 1024
    largest_file_mb = max(p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors")) / 2**20
    print(
        f"model {size / 2**20:.0f} MB, largest output file {largest_file_mb:.0f} MB, peak RSS grew {grown_mb:.0f} MB"
    )
    assert grown_mb < largest_file_mb + 32, (grown_mb, largest_file_mb, size / 2**20)
    assert size / 2**20 > 4 * (largest_file_mb + 32)  # the bound is far below what loading everything costs
