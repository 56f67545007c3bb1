"""Mutation fuzzing of llm_sepweight's readers, run in a worker process with capped memory and a deadline per case.

`python fuzz_engine.py TARGET CASES SEED` prints one JSON line: the outcomes by kind and the unexpected ones.
Targets: `safetensors` (read_header, then every tensor of the SafetensorsFile), `manifest`
(format.read_manifest), `gguf` (gguf_source: the reader, config and tokenizer rebuild, two tensors read),
`spec` (PartSpec.parse, resolve and the str round trip). Each case takes a valid input, applies 1-4 random
mutations (bit flips, interesting bytes, 4/8-byte integers set to huge values, inserts, deletes,
truncation, duplicated chunks, and for text inputs numbers and brackets swapped for hostile ones) and runs
the target. A documented outcome is a result or a `ValueError` (every error type of llm_sepweight is one);
anything else, a case past its deadline, or a `MemoryError` under the address-space cap is unexpected.
"""

from __future__ import annotations

import json
import random
import resource
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEADLINE_S = 5.0  # per case; the slowest valid case takes a few milliseconds
MEMORY_HEADROOM = 1 << 30  # address space allowed above what the worker holds after its imports
_HUGE = [0, 1, 0x7F, 0x80, 0xFF, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
_TEXT_SWAPS = [
    "-1",
    "0",
    "1e400",
    "99999999999999999999999",
    "[" * 2000,
    "{" * 2000,
    '"',
    "null",
    "true",
    "\\u0000",
]


class _Deadline(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Deadline


def mutate(data: bytes, rng: random.Random, text: bool = False) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(9 if text else 8)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            i = min(pos, len(buf) - 1)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[min(pos, len(buf) - 1)] = rng.choice([0, 0x7F, 0x80, 0xFF, ord("0"), ord("9")])
        elif op in (2, 3):
            width = 4 if op == 2 else 8
            value = rng.choice(_HUGE) % (1 << (8 * width))
            buf[pos : pos + width] = value.to_bytes(width, "little")
        elif op == 4:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 5:
            del buf[pos : pos + rng.randint(1, 64)]
        elif op == 6:
            del buf[rng.randrange(len(buf) + 1) :]
        elif op == 7 and buf:
            start = rng.randrange(len(buf))
            buf[pos:pos] = buf[start : start + rng.randint(1, 256)]
        elif op == 8:
            buf[pos : pos + rng.randint(0, 6)] = rng.choice(_TEXT_SWAPS).encode()
    return bytes(buf)


# --- the valid inputs ------------------------------------------------------------------------------------


def _safetensors_seed(tmp: Path) -> bytes:
    import torch
    from safetensors.torch import save_file

    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.arange(5),
        "c": torch.ones(2, 2, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 3),
    }
    save_file(tensors, str(tmp / "seed.safetensors"), metadata={"format": "pt"})
    return (tmp / "seed.safetensors").read_bytes()


def _manifest_seed(tmp: Path) -> bytes:
    import torch

    from llm_sepweight import dump

    state = {"emb.weight": torch.randn(4, 2), "h.0.w": torch.randn(2, 2), "h.1.w": torch.randn(2, 2)}

    def decider(key: str) -> list[str]:
        if key.startswith("h."):
            _, layer, rest = key.split(".", 2)
            return ["mid", layer, rest]
        return ["start", key]

    out = dump(decider, state, tmp / "sw", config={"model_type": "llama", "num_hidden_layers": 2})
    return (out / "manifest.json").read_bytes()


def _gguf_seed(tmp: Path) -> bytes:
    import gguf
    import numpy as np

    path = tmp / "seed.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>", "\u2581a", "b", "\u2581ab", "c", "\u2581"]
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0, 0.0, 0.0, -1.0, -2.0, -0.5, -3.0, -4.0])
    writer.add_token_types([2, 3, 3, 1, 1, 1, 1, 1])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((8, 8), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", rng.standard_normal((8, 8), dtype=np.float32))
    writer.add_tensor("blk.0.attn_k.weight", rng.standard_normal((4, 8)).astype(np.float16))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


_SPECS = ["b 0-12", "12-24", "24-32 e", "f", "b e", "b 0-2 5-7 e", "0-100000000", "3-4 e"]


# --- the targets -----------------------------------------------------------------------------------------


def _run_safetensors(path: Path, data: bytes, rng: random.Random) -> None:
    from llm_sepweight.safetensors_file import SafetensorsFile, read_header

    path.write_bytes(data)
    infos, _ = read_header(path)
    with SafetensorsFile(path) as f:
        for name in infos:
            f.tensor(name).sum()


def _run_manifest(path: Path, data: bytes, rng: random.Random) -> None:
    from llm_sepweight import format as fmt

    (path / fmt.MANIFEST).write_bytes(data)
    fmt.read_manifest(path)


def _run_gguf(path: Path, data: bytes, rng: random.Random) -> None:
    from llm_sepweight.gguf import gguf_source

    path.write_bytes(data)
    source = gguf_source(path)
    for t in source.tensors[:2]:
        t.read()


def _run_spec(path: Path, data: bytes, rng: random.Random) -> None:
    from llm_sepweight import PartSpec

    spec = PartSpec.parse(data.decode("utf-8", errors="replace"))
    if PartSpec.parse(str(spec)) != spec:
        raise AssertionError(f"str round trip changed {spec!r}")
    spec.resolve(rng.randrange(0, 64))


TARGETS: dict[str, tuple[Callable[[Path], bytes], Callable[[Path, bytes, random.Random], None], bool]] = {
    "safetensors": (_safetensors_seed, _run_safetensors, False),
    "manifest": (_manifest_seed, _run_manifest, True),
    "gguf": (_gguf_seed, _run_gguf, False),
    "spec": (lambda tmp: _SPECS[0].encode(), _run_spec, True),
}


def _cap_memory() -> None:
    with open("/proc/self/status") as status:
        vm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + MEMORY_HEADROOM, vm + MEMORY_HEADROOM))


def run(target: str, cases: int, seed: int) -> dict[str, Any]:
    seed_fn, run_fn, text = TARGETS[target]
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    unexpected: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        valid = seed_fn(tmp)
        seeds = [s.encode() for s in _SPECS] if target == "spec" else [valid]
        path = tmp / "sw" if target == "manifest" else tmp / f"case.{target}"
        import torch  # noqa: F401  (imported before the cap: its import maps hundreds of MB)

        _cap_memory()
        signal.signal(signal.SIGALRM, _alarm)
        start = time.perf_counter()
        for _ in range(cases):
            data = mutate(rng.choice(seeds), rng, text)
            kind = _one(run_fn, path, data, rng)
            outcomes[kind] += 1
            if kind.startswith("unexpected"):
                unexpected.append({"outcome": kind, "input_hex": data[:4096].hex()})
        seconds = time.perf_counter() - start
    return {"target": target, "cases": cases, "seed": seed, "seconds": round(seconds, 3),
            "outcomes": dict(outcomes), "unexpected": unexpected[:20]}  # fmt: skip


def _one(
    run_fn: Callable[[Path, bytes, random.Random], None], path: Path, data: bytes, rng: random.Random
) -> str:
    signal.setitimer(signal.ITIMER_REAL, DEADLINE_S)
    try:
        run_fn(path, data, rng)
        return "ok"
    except _Deadline:
        return "unexpected:deadline"
    except MemoryError:
        return "unexpected:MemoryError"
    except ValueError as e:
        return f"error:{type(e).__name__}"
    except Exception as e:
        return f"unexpected:{type(e).__name__}: {str(e)[:200]}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
