#!/usr/bin/env bash
# GPU variant of tools/bench/bench_big.py. NOT RUN YET: no session that wrote it had a GPU.
#
# On a CUDA machine (one GPU, its own disk), in under 8 minutes:
# 1. builds a big-model fixture of about 1.5x the free GPU memory on the local disk (tools/bigmodel.py,
#    layer count chosen from `nvidia-smi --query-gpu=memory.free`),
# 2. measures a plain pinned cudaMemcpyAsync of one layer's bytes (host -> device GB/s),
# 3. streams the decoder layers with llm_offload from pinned host memory (CpuSource) and from disk
#    (SepweightSource(direct=True)), batch-1 and batch-8 decode, and reports the copy stream's achieved
#    GB/s against step 2, and the overlap from Offload.stats.
# Results go to $OUT/gpu_big.json (or tools/bench/results/gpu_big.json).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-tools/bench/results}
mkdir -p "$OUT"
FREE_MIB=$(nvidia-smi --query-gpu=memory.free --format=csv,noheader,nounits | head -1)
# Qwen2.5-14B shapes: 550 MB per layer + 3.1 GB of embeddings and head
LAYERS=$(( (FREE_MIB * 1048576 * 3 / 2 - 3100000000) / 550000000 ))
BIG=${BIG:-/tmp/llm_microlibs_big}
timeout 120 "$PY" tools/bigmodel.py --layers "$LAYERS" --out "$BIG"
timeout 330 "$PY" - "$BIG" "$OUT/gpu_big.json" <<'PYEOF'
import json, sys, time
import torch
sys.path.insert(0, "tools")
import bigmodel
from llm_offload import CpuSource, SepweightSource, offload

path, out = sys.argv[1], sys.argv[2]
dev = torch.device("cuda")
res = {"gpu": torch.cuda.get_device_name(), "model_bytes": bigmodel.model_bytes(__import__("pathlib").Path(path))}
src = SepweightSource(path, direct=True)
one = src.load(0)
nbytes = sum(t.nbytes for t in one.values())
host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
devbuf = torch.empty(nbytes, dtype=torch.uint8, device=dev)
stream = torch.cuda.Stream()
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(10):
    with torch.cuda.stream(stream):
        devbuf.copy_(host, non_blocking=True)
stream.synchronize()
res["pinned_copy_gbps"] = 10 * nbytes / (time.perf_counter() - t) / 1e9

def decode(part, off, batch):
    f = part.as_forward_func(max_seq_len=64)
    ids = torch.randint(0, 1000, (batch, 8), device=dev)
    with torch.inference_mode():
        logits = f(ids)
        torch.cuda.synchronize()
        off.reset_stats()
        t = time.perf_counter()
        for _ in range(3):
            logits = f(logits[:, -1:].argmax(-1))
        torch.cuda.synchronize()
    st = off.stats
    return {"s_per_step": (time.perf_counter() - t) / 3, "overlap": st.overlap,
            "copy_gbps": st.bytes / st.transfer_s / 1e9 if st.transfer_s else None}

for kind in ("disk", "pinned"):
    part, off = bigmodel.stream_part(path, max_resident_bytes=3 * 560_000_000, direct=True)
    if kind == "pinned":
        off.remove()
        n = len(part.layers)
        off = offload(part.layers, CpuSource([src.load(i) for i in range(min(n, 8))] * (n // 8 + 1)), dev,
                      max_resident_bytes=3 * 560_000_000)  # 8 distinct layers reused: host RAM is finite
    else:
        off.remove()
        off = offload(part.layers, src, dev, max_resident_bytes=3 * 560_000_000)
    from llm_offload import move_resident
    move_resident(part, dev)  # embeddings, head, rotary tables; the streamed layers stay meta
    res[kind] = {str(b): decode(part, off, b) for b in (1, 8)}
    off.remove()
json.dump(res, open(out, "w"), indent=2)
print(json.dumps(res, indent=2))
PYEOF
