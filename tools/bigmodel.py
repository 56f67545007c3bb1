"""A big-model fixture: a seeded random bf16 checkpoint with a real architecture's shapes, larger than RAM.

`python tools/bigmodel.py [--layers 52] [--out DIR]` writes Hugging Face sharded safetensors with an index
(`model.safetensors.index.json`, what accelerate and transformers read) and the SmolLM2 tokenizer files
(any tokenizer whose ids fit the vocabulary will do: the weights are random). The default is Qwen2.5-14B's
shapes (hidden 5120, MLP 13824, 40 query / 8 KV heads, vocabulary 152,064, untied head) with 52 layers
instead of 48, 31.7 GB, so that the model is more than 1.2x the 24 GB of RAM of the benchmark machine.

Streaming with bounded memory at close to disk write speed: the values come from one 64 MB pool of
N(0, 0.02) bf16 numbers (seeded), each tensor a seeded cyclic window into it, written in 256 MB pieces;
each piece is synced and dropped from the page cache (POSIX_FADV_DONTNEED) once written, so neither the
process nor the page cache grows with the model. A `.complete` marker is written last: a directory without
it is rebuilt. Built on demand by the benchmarks (tools/bench/bench_big.py), never by CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

QWEN25_14B: dict[str, Any] = {  # Qwen/Qwen2.5-14B config.json (transformers < 5 dialect), layer count aside
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 5120,
    "initializer_range": 0.02,
    "intermediate_size": 13824,
    "max_position_embeddings": 131072,
    "max_window_layers": 48,
    "model_type": "qwen2",
    "num_attention_heads": 40,
    "num_hidden_layers": 48,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
}
DEFAULT_LAYERS = 52
POOL_VALUES = 32 << 20  # 64 MB of bf16
PIECE = 256 << 20
SHARD_BYTES = 2 << 30


def cache_root() -> Path:
    import fixtures

    return Path(fixtures.cache_dir())


def default_dir(layers: int = DEFAULT_LAYERS) -> Path:
    return cache_root() / "big" / f"qwen2.5-14b-shapes-L{layers}"


def tensor_shapes(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """HF names and shapes in file order: begin, each layer (q/k/v and gate/up back to back, as a part's
    fused projections take them without a copy), end."""
    h, m, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * d
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.q_proj.bias", (h,)),
            (p + "self_attn.k_proj.bias", (kv,)),
            (p + "self_attn.v_proj.bias", (kv,)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (m, h)),
            (p + "mlp.up_proj.weight", (m, h)),
            (p + "mlp.down_proj.weight", (h, m)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def _shards(
    shapes: list[tuple[str, tuple[int, ...]]], shard_bytes: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors cut into shards of about `shard_bytes`, never splitting a layer (a layer is one read)."""
    groups: list[list[tuple[str, tuple[int, ...]]]] = []
    for name, shape in shapes:
        parts = name.split(".")
        key = parts[2] if parts[:2] == ["model", "layers"] else name
        if groups and groups[-1][0][0] == key:
            groups[-1][1].append((name, shape))
        else:
            groups.append((key, [(name, shape)]))  # type: ignore[arg-type]
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for _, members in groups:  # type: ignore[misc]
        nbytes = sum(2 * int(np.prod(s)) for _, s in members)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(members)
        size += nbytes
    return shards


class _Writer:
    """Sequential writes in pieces; each piece synced and dropped from the page cache."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.pos = 0
        self.dropped = 0

    def write(self, data: memoryview) -> None:
        done = 0
        while done < len(data):
            done += os.write(self.fd, data[done:])
        self.pos += len(data)
        if self.pos - self.dropped >= PIECE:
            self.drop()

    def drop(self) -> None:
        os.fdatasync(self.fd)
        os.posix_fadvise(self.fd, self.dropped, self.pos - self.dropped, os.POSIX_FADV_DONTNEED)
        self.dropped = self.pos

    def close(self) -> None:
        self.drop()
        os.fsync(self.fd)
        os.close(self.fd)


def _values(name: str, shape: tuple[int, ...]) -> str:
    if name.endswith("norm.weight"):
        return "ones"
    if name.endswith(".bias"):
        return "small"
    return "pool"


def write_checkpoint(
    out: Path, config: dict[str, Any], *, seed: int = 0, shard_bytes: int = SHARD_BYTES, progress: bool = True
) -> Path:
    """Write the checkpoint into `out` (replaced if present). Returns `out`."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    pool = (torch.randn(POOL_VALUES, generator=gen) * 0.02).to(torch.bfloat16).view(torch.int16).numpy()
    pool_bytes = memoryview(pool.view(np.uint8))
    n_pool = len(pool_bytes)
    ones = np.full(1 << 16, 0x3F80, dtype=np.uint16)  # bf16 1.0
    shards = _shards(tensor_shapes(config), shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    t0 = time.perf_counter()
    for k, members in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in members:
            nbytes = 2 * int(np.prod(shape))
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        w = _Writer(out / fname)
        w.write(memoryview(struct.pack("<Q", len(text)) + text))
        for name, shape in members:
            nbytes = 2 * int(np.prod(shape))
            kind = _values(name, shape)
            if kind == "ones":
                w.write(memoryview(ones.view(np.uint8))[:nbytes])
                continue
            start = (zlib.crc32(f"{seed}:{name}".encode()) * 2) % n_pool
            if kind == "small":  # biases: a tenth of the pool's scale is plenty
                vals = (
                    torch.from_numpy(pool[start // 2 : start // 2 + nbytes // 2].copy()).view(torch.bfloat16)
                    * 0.1
                )
                if vals.numel() < nbytes // 2:
                    vals = torch.zeros(nbytes // 2, dtype=torch.bfloat16)
                w.write(memoryview(vals.view(torch.int16).numpy().view(np.uint8)))
                continue
            left = nbytes
            while left:
                n = min(left, n_pool - start, PIECE)
                w.write(pool_bytes[start : start + n])
                left -= n
                start = (start + n) % n_pool
        w.close()
        total += w.pos
        if progress:
            rate = total / (time.perf_counter() - t0) / 1e9
            print(f"  {fname}: {total / 1e9:.1f} GB written, {rate:.2f} GB/s", flush=True)
    meta = {"metadata": {"total_size": sum(2 * int(np.prod(s)) for _, s in tensor_shapes(config))}}
    (out / "model.safetensors.index.json").write_text(
        json.dumps({**meta, "weight_map": weight_map}, indent=1)
    )
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _copy_tokenizer(out)
    (out / ".complete").write_text(
        json.dumps({"seed": seed, "bytes": total, "seconds": time.perf_counter() - t0})
    )
    return out


def _copy_tokenizer(out: Path) -> None:
    """SmolLM2's tokenizer (ids < 49,152 fit any vocabulary here); the fixtures cache holds it."""
    import fixtures

    src = Path(fixtures.real_checkpoint("smollm2"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (src / name).is_file():
            shutil.copy(src / name, out / name)


def config_with_layers(layers: int = DEFAULT_LAYERS) -> dict[str, Any]:
    cfg = dict(QWEN25_14B)
    cfg["num_hidden_layers"] = layers
    cfg["max_window_layers"] = layers
    return cfg


def ensure(
    layers: int = DEFAULT_LAYERS, out: Path | None = None, *, seed: int = 0
) -> tuple[Path, float | None]:
    """The fixture directory, built if absent or incomplete; and the seconds building took (None: cached)."""
    out = out or default_dir(layers)
    if (out / ".complete").is_file():
        return out, None
    t0 = time.perf_counter()
    write_checkpoint(out, config_with_layers(layers), seed=seed)
    return out, time.perf_counter() - t0


def drop_page_cache(paths: list[Path]) -> None:
    """POSIX_FADV_DONTNEED on whole files (pages still mapped somewhere are kept by the kernel)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def model_bytes(path: Path) -> int:
    """Bytes of tensor data in the checkpoint (what a pass over every weight reads)."""
    return int(json.loads((path / "model.safetensors.index.json").read_text())["metadata"]["total_size"])


def stream_part(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    max_resident_bytes: int | None = None,
    prefetch_depth: int = 2,
    direct: bool = True,
    layers: tuple[int, int] | None = None,
    begin: bool = True,
    end: bool = True,
    threads: int | None = None,
) -> tuple[Any, Any]:
    """A `llm_model_parts.Part` whose decoder layers stream from `path` (sepweight or HF shards) through
    llm_offload, its begin and end resident: `(part, offload_handle)`. Only begin and end are read here.

    `dtype`: the compute dtype (None: the stored one; torch.float32 upcasts each layer as it arrives).
    `threads`: reader threads (two O_DIRECT reads in flight keep the disk's queue fuller than one).
    `layers`: (first, stop) to hold a range only (a pipeline rank), with `begin` / `end` as that rank has."""
    from llm_model_parts import Part
    from llm_model_parts.config import ModelConfig
    from llm_model_parts.loading import assign, tie
    from llm_offload import SepweightSource, offload
    from llm_sepweight import Checkpoint, PartSpec

    checkpoint = Checkpoint(path)
    config = ModelConfig.from_hf(checkpoint.config)
    lo, hi = layers if layers is not None else (0, config.num_hidden_layers)
    spec = " ".join(["b"] * begin + [f"{lo}-{hi}"] + ["e"] * end)
    part = Part(config, PartSpec.coerce(spec).resolve(config.num_hidden_layers))
    source = SepweightSource(path, layers=part.layer_indices, direct=direct)
    stored = next(iter(source.plan(0).tensors.values()))[0] if dtype is None else dtype
    part.layers.to(stored)  # still on meta: the modules' dtype is what the streamed weights become
    weights: dict[str, torch.Tensor] = {}
    for section in ["b"] * begin + ["e"] * end:  # one at a time: the peak is the part plus one section
        loaded = checkpoint.load(section)
        weights.update({k: v.clone() for k, v in (loaded.begin if section == "b" else loaded.end).items()})
        del loaded
        checkpoint.close()  # the part owns its copies: the shards' maps go, and their pages with them
        drop_page_cache([Path(path) / f for f in checkpoint.files(section)])
    if weights:
        assign(part, weights, "cpu", stored)
        tie(part)
    handle = offload(
        part.layers,
        source,
        "cpu",
        prefetch_depth=prefetch_depth,
        max_resident_bytes=max_resident_bytes,
        threads=threads,
    )
    return part.eval(), handle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=DEFAULT_LAYERS)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if complete")
    args = ap.parse_args()
    out = args.out or default_dir(args.layers)
    if args.force and out.exists():
        shutil.rmtree(out)
    path, seconds = ensure(args.layers, out, seed=args.seed)
    print(
        f"{path}: {model_bytes(path) / 1e9:.2f} GB"
        + (f", built in {seconds:.0f} s" if seconds else " (cached)")
    )


if __name__ == "__main__":
    main()
