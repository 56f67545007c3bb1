"""Split a model's layers across nodes in proportion to each node's memory: `plan_split`.

Sizes come from the checkpoint itself (the tensors' shapes in a sepweight manifest or in the safetensors
headers of an HF directory), at the dtype the nodes will run. Each node first reserves what does not
depend on how many layers it holds (activations of one call, `reserve`), the first node the embeddings, the
last the final norm, the head and the logits; the rest is shared out as decoder layers, each costing its
weights plus its KV cache for `batch_size` rows of `max_seq_len` tokens.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}
_BYTES = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", re.IGNORECASE)


def parse_bytes(value: int | float | str) -> int:
    """`24GiB`, `8GB`, `512M`, `1.5g`, or a number of bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"a memory size cannot be negative, got {value}")
        return int(value)
    m = _BYTES.fullmatch(str(value))
    if not m:
        raise ValueError(f"cannot read memory size {value!r}: expected e.g. '24GiB', '8GB', '512M' or bytes")
    number, unit, binary = float(m.group(1)), m.group(2).lower(), m.group(3)
    scale = 1024 ** ("kmgt".index(unit) + 1) if (binary and unit) else _UNITS[unit]
    return int(number * scale)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def detect_memory(device: str | torch.device) -> int:
    """Free memory of `device`: CUDA free memory, or on CPU the host's available memory shared among the
    processes torchrun started on this host (LOCAL_WORLD_SIZE)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return available // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


@dataclass(frozen=True)
class ModelSizes:
    """Bytes at the running dtype: weights of begin, of each layer, of end; KV cache per token per row."""

    begin: int
    layers: tuple[int, ...]
    end: int
    kv_per_token: tuple[int, ...]  # per layer, bytes of keys and values for one token of one row
    hidden_size: int
    intermediate_size: int
    num_heads: int
    vocab_size: int


def model_sizes(checkpoint: Any, dtype: torch.dtype = torch.float32) -> ModelSizes:
    """Sizes of `checkpoint` (an llm_sepweight.Checkpoint or a directory path) when run in `dtype`."""
    from llm_sepweight import Checkpoint
    from llm_sepweight.format import BEGIN_FILE, END_FILE
    from llm_sepweight.manifest import weight_layer
    from llm_sepweight.names import split_names, text_config, tie_word_embeddings
    from llm_sepweight.safetensors_file import DTYPES

    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    n = ckpt.num_layers
    begin, end, layers = 0, 0, [0] * n
    itemsize = torch.empty((), dtype=dtype).element_size()

    def nbytes(stored: str, shape: Sequence[int]) -> int:
        numel = 1
        for d in shape:
            numel *= int(d)
        stored_dtype = DTYPES.get(stored.upper())
        if stored_dtype is not None and stored_dtype.is_floating_point:
            return numel * itemsize  # weights run at `dtype`
        return numel * (stored_dtype.itemsize if stored_dtype is not None else 4)

    if ckpt.kind == "sepweight":
        assert ckpt.manifest is not None
        for file, entry in ckpt.manifest["files"].items():  # validated: weight file names only
            size = sum(nbytes(t["dtype"], t["shape"]) for t in entry["tensors"])
            layer = weight_layer(file)
            if file == BEGIN_FILE:
                begin += size
            elif file == END_FILE:
                end += size
            elif layer is not None:
                layers[layer] += size
    elif ckpt.kind == "hf":
        tensors = _hf_tensors(Path(ckpt.path))
        has_head = False
        embedding = 0
        for name, loc in split_names(ckpt.architecture, list(tensors), n).items():
            size = nbytes(*tensors[name])
            if loc.section == "begin":
                begin += size
                if "embed" in loc.name or loc.name in ("wte.weight", "word_embeddings.weight"):
                    embedding = max(embedding, size)
            elif loc.section == "end":
                end += size
                has_head = has_head or loc.name == "lm_head.weight"
            elif loc.layer is not None:
                layers[loc.layer] += size
        if not has_head and tie_word_embeddings(ckpt.config):
            end += embedding  # a tied head is its own copy on the node that holds end
    else:
        raise ValueError(
            f"{ckpt.path}: plan_split reads tensor sizes from a sepweight manifest or safetensors headers; "
            f"this is a {ckpt.kind!r} checkpoint: convert it with llm_sepweight.convert first"
        )
    cfg = text_config(ckpt.config)
    hidden = int(cfg.get("hidden_size") or cfg.get("n_embd") or 0)
    heads = int(cfg.get("num_attention_heads") or cfg.get("n_head") or 1)
    kv_heads = int(cfg.get("num_key_value_heads") or cfg.get("num_kv_heads") or heads)
    head_dim = int(cfg.get("head_dim") or (hidden // heads if heads else 0))
    kv = 2 * kv_heads * head_dim * itemsize
    return ModelSizes(
        begin=begin,
        layers=tuple(layers),
        end=end,
        kv_per_token=(kv,) * n,
        hidden_size=hidden,
        intermediate_size=int(cfg.get("intermediate_size") or 4 * hidden),
        num_heads=heads,
        vocab_size=int(cfg.get("vocab_size") or 0),
    )


def _hf_tensors(path: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (stored dtype, shape) from the headers of every safetensors file of an HF directory, each
    read and validated by llm_sepweight's safetensors reader (a corrupt header is a `SafetensorsError`)."""
    from llm_sepweight.safetensors_file import Header

    files = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("."))
    if not files:
        raise ValueError(
            f"{path}: no *.safetensors files; plan_split needs safetensors (or a sepweight directory)"
        )
    out: dict[str, tuple[str, list[int]]] = {}
    for file in files:
        for name, info in Header.read(file).tensors.items():
            out[name] = (info.dtype_name, list(info.shape))
    return out


def activation_bytes(
    sizes: ModelSizes, *, tokens: int, max_seq_len: int, batch_size: int, itemsize: int
) -> int:
    """Peak working memory of one layer for a call of `tokens` positions (hidden states, MLP, attention
    scores against up to `max_seq_len` keys, which SDPA's math path materialises in fp32)."""
    rows = batch_size * tokens
    hidden = rows * sizes.hidden_size * itemsize * 4  # residual, normed input, attention output, next input
    mlp = rows * sizes.intermediate_size * itemsize * 3  # gate, up, activation
    scores = batch_size * sizes.num_heads * tokens * max_seq_len * 4
    return hidden + mlp + scores


def plan_split(
    checkpoint: Any,
    memory_budgets: Sequence[int | str],
    *,
    dtype: torch.dtype = torch.float32,
    max_seq_len: int = 2048,
    batch_size: int = 1,
    prefill_chunk: int | None = None,
    reserve: int | str | Sequence[int | str] = 0,
) -> list[str]:
    """One part spec per node, layers in proportion to the memory each node has left, begin on the first
    node and end on the last: `["b 0-12", "12-24", "24-32 e"]`.

    `memory_budgets`: bytes (or "24GiB" ...) each node may use. `prefill_chunk`: the most positions one call
    carries (the pipeline's prefill_chunk; default max_seq_len), which bounds activations and logits.
    `reserve`: bytes to keep free on every node (or one value per node), e.g. for the CUDA context.
    Raises ValueError naming the node and the shortfall when the model does not fit.
    """
    budgets = [parse_bytes(b) for b in memory_budgets]
    n = len(budgets)
    if n == 0:
        raise ValueError("memory_budgets is empty: give one budget per node")
    if max_seq_len < 1 or batch_size < 1:
        raise ValueError(f"max_seq_len and batch_size must be >= 1, got {max_seq_len}, {batch_size}")
    reserves = (
        [parse_bytes(r) for r in reserve]
        if isinstance(reserve, Sequence) and not isinstance(reserve, str)
        else [parse_bytes(reserve)] * n
    )
    if len(reserves) != n:
        raise ValueError(f"reserve has {len(reserves)} values for {n} nodes")
    sizes = model_sizes(checkpoint, dtype)
    num_layers = len(sizes.layers)
    if n > num_layers:
        raise ValueError(
            f"{n} nodes but the model has only {num_layers} layers: use at most {num_layers} nodes"
        )
    itemsize = torch.empty((), dtype=dtype).element_size()
    tokens = min(prefill_chunk or max_seq_len, max_seq_len)
    act = activation_bytes(
        sizes, tokens=tokens, max_seq_len=max_seq_len, batch_size=batch_size, itemsize=itemsize
    )
    logits = batch_size * tokens * sizes.vocab_size * max(itemsize, 4)
    cost = [w + kv * batch_size * max_seq_len for w, kv in zip(sizes.layers, sizes.kv_per_token, strict=True)]
    fixed = [reserves[i] + act for i in range(n)]
    fixed[0] += sizes.begin
    fixed[-1] += sizes.end + logits
    avail = [b - f for b, f in zip(budgets, fixed, strict=True)]
    _check_fits(budgets, fixed, avail, cost, sizes, act, logits, batch_size, max_seq_len)
    bounds = _boundaries(avail, cost)
    specs = []
    for i in range(n):
        tokens_ = [f"{bounds[i]}-{bounds[i + 1]}"]
        if i == 0:
            tokens_.insert(0, "b")
        if i == n - 1:
            tokens_.append("e")
        specs.append(" ".join(tokens_))
    for i, s in enumerate(specs):
        used = fixed[i] + sum(cost[bounds[i] : bounds[i + 1]])
        logger.debug("node %d: %r uses %s of %s", i, s, format_bytes(used), format_bytes(budgets[i]))
    return specs


def _check_fits(
    budgets: list[int],
    fixed: list[int],
    avail: list[int],
    cost: list[int],
    sizes: ModelSizes,
    act: int,
    logits: int,
    batch_size: int,
    max_seq_len: int,
) -> None:
    need = sum(fixed) + sum(cost)
    total = sum(budgets)
    if need > total:
        kv = sum(sizes.kv_per_token) * batch_size * max_seq_len
        weights = sizes.begin + sizes.end + sum(sizes.layers)
        raise ValueError(
            f"the model does not fit: it needs {format_bytes(need)} (weights {format_bytes(weights)}, KV cache "
            f"{format_bytes(kv)} for batch_size={batch_size} x max_seq_len={max_seq_len}, activations "
            f"{format_bytes(act)} per node, logits {format_bytes(logits)}) but the budgets total "
            f"{format_bytes(total)}: short by {format_bytes(need - total)}; add memory or nodes, or lower "
            "max_seq_len, batch_size or the dtype"
        )
    smallest = min(cost)
    for i, a in enumerate(avail):
        if a < smallest:
            what = " + begin" if i == 0 else ""
            what += " + end and logits" if i == len(avail) - 1 else ""
            raise ValueError(
                f"node {i} (budget {format_bytes(budgets[i])}) cannot hold one layer: activations{what} take "
                f"{format_bytes(fixed[i])}, leaving {format_bytes(a)}, and a layer with its KV cache needs "
                f"{format_bytes(smallest)}: short by {format_bytes(smallest - a)}"
            )


def _boundaries(avail: list[int], cost: list[int]) -> list[int]:
    """Layer boundaries 0 = k_0 < k_1 < ... < k_n = L: node i holds [k_i, k_{i+1}), costing at most avail[i],
    each boundary as close as the others allow to a share of the layers proportional to avail[i]."""
    n, num_layers = len(avail), len(cost)
    prefix = [0]
    for c in cost:
        prefix.append(prefix[-1] + c)
    # ok[i][k]: nodes i..n-1 can hold layers [k, L), at least one layer each
    ok = [[False] * (num_layers + 1) for _ in range(n + 1)]
    ok[n][num_layers] = True
    for i in range(n - 1, -1, -1):
        for k in range(num_layers):
            for j in range(k + 1, num_layers + 1):
                if prefix[j] - prefix[k] > avail[i]:
                    break
                if ok[i + 1][j]:
                    ok[i][k] = True
                    break
    if not ok[0][0]:
        raise ValueError(
            "the layers cannot be split into consecutive parts within the budgets (memory left per node after "
            f"embeddings, head and activations: {[format_bytes(a) for a in avail]}; layers with KV cache: "
            f"{format_bytes(min(cost))} to {format_bytes(max(cost))} each); add memory to the smallest nodes"
        )
    share = sum(max(a, 0) for a in avail)
    bounds = [0]
    for i in range(n - 1):
        start = bounds[-1]
        target = prefix[-1] * sum(max(a, 0) for a in avail[: i + 1]) / share
        choices = [
            j
            for j in range(start + 1, num_layers + 1)
            if prefix[j] - prefix[start] <= avail[i] and ok[i + 1][j]
        ]
        bounds.append(min(choices, key=lambda j: (abs(prefix[j] - target), j)))
    bounds.append(num_layers)
    return bounds
