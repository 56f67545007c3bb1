"""plan_split: sizes against the architecture's formula, proportional splits, and clear errors."""

from __future__ import annotations

import itertools
import json
import random
import struct
import sys
from pathlib import Path

import pytest
import torch

from llm_model_parts.pipeline.plan import _boundaries, model_sizes, parse_bytes, plan_split

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

GiB = 1024**3


def _llama_numels(cfg: dict) -> tuple[int, int, int]:
    """(begin, one layer, end) parameter counts of a llama-style model, from the paper's shapes."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    d = cfg.get("head_dim", h // heads)
    attn = h * heads * d + 2 * h * kv * d + heads * d * h
    return v * h, attn + 3 * h * i + 2 * h, h + v * h  # end: final norm + head (a tied head is a copy)


def _fake_llama(path: Path, cfg: dict, dtype: str = "BF16") -> Path:
    """An HF directory whose safetensors file has real headers and sparse (unwritten) data."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = h // heads
    shapes = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h], "lm_head.weight": [v, h]}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {
            p + "self_attn.q_proj.weight": [heads * d, h],
            p + "self_attn.k_proj.weight": [kv * d, h],
            p + "self_attn.v_proj.weight": [kv * d, h],
            p + "self_attn.o_proj.weight": [h, heads * d],
            p + "mlp.gate_proj.weight": [i, h],
            p + "mlp.up_proj.weight": [i, h],
            p + "mlp.down_proj.weight": [h, i],
            p + "input_layernorm.weight": [h],
            p + "post_attention_layernorm.weight": [h],
        }
    item = {"BF16": 2, "F32": 4}[dtype]
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = item
        for s in shape:
            n *= s
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)  # sparse: no disk space for the data
    (path / "config.json").write_text(
        json.dumps({"model_type": "llama", "tie_word_embeddings": False, **cfg})
    )
    return path


LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 32,
}


def test_parse_bytes() -> None:
    assert parse_bytes("24GiB") == 24 * GiB
    assert parse_bytes("8GB") == 8 * 10**9
    assert parse_bytes("512M") == 512 * 10**6
    assert parse_bytes("1.5 gib") == int(1.5 * GiB)
    assert parse_bytes(123) == 123
    with pytest.raises(ValueError, match="cannot read memory size 'lots'"):
        parse_bytes("lots")


def test_smollm2_sizes_match_the_llama_formula() -> None:
    import fixtures

    path = fixtures.real_checkpoint("smollm2")
    cfg = json.loads((path / "config.json").read_text())
    begin, layer, end = _llama_numels(cfg)
    sizes = model_sizes(path, torch.float32)
    assert sizes.begin == 4 * begin
    assert sizes.layers == (4 * layer,) * 30
    assert sizes.end == 4 * end  # tied: the node holding end keeps its own copy of the embedding
    assert sizes.kv_per_token[0] == 2 * 3 * 64 * 4
    half = model_sizes(path, torch.bfloat16)
    assert half.layers[0] * 2 == sizes.layers[0]


def test_smollm2_plan_covers_the_model_and_respects_budgets() -> None:
    import fixtures

    path = fixtures.real_checkpoint("smollm2")
    specs = plan_split(path, ["1GiB", "1GiB", "1GiB"], dtype=torch.float32, max_seq_len=512, batch_size=1)
    assert specs[0].startswith("b ") and specs[-1].endswith(" e")
    ranges = [tuple(int(x) for x in s.replace("b ", "").replace(" e", "").split("-")) for s in specs]
    assert ranges[0][0] == 0 and ranges[-1][1] == 30
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    # the first node carries the embeddings, the last the head and the logits: the middle one gets the most layers
    counts = [b - a for a, b in ranges]
    assert counts[1] >= max(counts[0], counts[2]), specs
    assert plan_split(path, ["4GiB"], max_seq_len=512) == ["b 0-30 e"]


def test_uneven_budgets_get_proportional_layers(tmp_path: Path) -> None:
    path = _fake_llama(tmp_path / "llama3-8b", LLAMA3_8B)
    specs = plan_split(path, ["24GiB", "12GiB", "8GiB"], dtype=torch.bfloat16, max_seq_len=4096, batch_size=1)
    ranges = [tuple(int(x) for x in s.replace("b ", "").replace(" e", "").split("-")) for s in specs]
    counts = [b - a for a, b in ranges]
    assert sum(counts) == 32 and specs[0].startswith("b 0-") and specs[-1].endswith("-32 e")
    assert counts[0] > counts[1] > counts[2], specs
    # every node's weights + KV cache fit its budget (independent arithmetic from the formula)
    begin, layer, end = _llama_numels(LLAMA3_8B)
    kv = 2 * 8 * 128 * 2 * 4096
    for n, (count, budget) in enumerate(zip(counts, [24, 12, 8], strict=True)):
        used = count * (2 * layer + kv) + (2 * begin if n == 0 else 0) + (2 * end if n == 2 else 0)
        assert used < budget * GiB, (n, used / GiB)


def test_too_small_budgets_name_the_shortfall(tmp_path: Path) -> None:
    path = _fake_llama(tmp_path / "llama3-8b", LLAMA3_8B)
    with pytest.raises(ValueError, match=r"does not fit: it needs .* short by"):
        plan_split(path, ["4GiB", "4GiB", "4GiB"], dtype=torch.bfloat16, max_seq_len=4096)
    with pytest.raises(ValueError, match=r"node 0 \(budget 1.00 GiB\) cannot hold one layer"):
        plan_split(path, ["1GiB", "20GiB", "20GiB"], dtype=torch.bfloat16, max_seq_len=4096)
    with pytest.raises(ValueError, match="only 32 layers"):
        plan_split(path, ["8GiB"] * 33, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="KV cache"):
        plan_split(path, ["24GiB", "24GiB"], dtype=torch.bfloat16, max_seq_len=131072, batch_size=8)


def test_tiny_sepweight_and_hf_sizes_agree(tmp_path: Path) -> None:
    import fixtures

    import llm_sepweight

    hf = fixtures.tiny_checkpoint("llama-tied")
    sw = tmp_path / "sw"
    llm_sepweight.convert(hf, sw)
    assert model_sizes(hf, torch.float16) == model_sizes(sw, torch.float16)


def test_boundaries_find_a_split_whenever_one_exists() -> None:
    rng = random.Random(0)
    for _ in range(300):
        layers, nodes = rng.randint(2, 7), rng.randint(1, 4)
        if nodes > layers:
            continue
        cost = [rng.randint(1, 5) for _ in range(layers)]
        avail = [rng.randint(0, 15) for _ in range(nodes)]
        feasible = [
            (0, *cuts, layers)
            for cuts in itertools.combinations(range(1, layers), nodes - 1)
            if all(
                sum(cost[a:b]) <= avail[i] for i, (a, b) in enumerate(itertools.pairwise((0, *cuts, layers)))
            )
        ]
        if not feasible:
            with pytest.raises(ValueError):
                _boundaries(avail, cost)
            continue
        bounds = _boundaries(avail, cost)
        assert bounds[0] == 0 and bounds[-1] == layers
        for i, (a, b) in enumerate(itertools.pairwise(bounds)):
            assert a < b and sum(cost[a:b]) <= avail[i], (avail, cost, bounds)
