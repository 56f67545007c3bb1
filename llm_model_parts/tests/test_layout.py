"""The decode layout (q/k/v and gate/up in one buffer each, wide projections column-major on the CPU):
same names, shapes and values as the checkpoint, same logits, one matmul per group, a safe fallback once
weights are swapped, and a load that copies a section at a time."""

from __future__ import annotations

import json

import pytest
import torch
from parts_testlib import fixtures, left_padded
from torch import nn

from llm_model_parts import Part, load_part
from llm_model_parts.layers.linear import linear
from llm_model_parts.layout import decode_layout, is_fused, linear_group
from llm_sepweight import Checkpoint

NAMES = [
    "llama",
    "llama-tied",
    "qwen2",
    "phi3",
    "gemma3_text",
]  # plain, q/k/v biases, fused checkpoint tensors, QK-norm


def _groups(part: Part) -> list[tuple[nn.Linear, ...]]:
    out = []
    for layer in part.layers:
        a, m = layer.self_attn, layer.mlp
        if hasattr(a, "q_proj"):
            out.append((a.q_proj, a.k_proj, a.v_proj))
        if hasattr(m, "gate_proj"):
            out.append((m.gate_proj, m.up_proj))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_layout_keeps_names_shapes_values_and_logits(name: str) -> None:
    path = fixtures.tiny_checkpoint(name)
    config = json.loads((path / "config.json").read_text())
    plain = load_part(path, "f", decode_layout=False)
    laid = load_part(path, "f")
    assert all(not is_fused(g) for g in _groups(plain))
    assert all(is_fused(g) for g in _groups(laid))
    plain_sd, laid_sd = plain.state_dict(), laid.state_dict()
    assert list(plain_sd) == list(laid_sd)
    for key, value in plain_sd.items():
        assert torch.equal(laid_sd[key], value), key
    ids, mask = left_padded(config["vocab_size"], [9, 5])
    with torch.inference_mode():
        plain.setup_cache(2, 16)
        laid.setup_cache(2, 16)
        torch.testing.assert_close(
            laid(ids, attention_mask=mask), plain(ids, attention_mask=mask), atol=1e-5, rtol=0
        )
        step = torch.randint(3, config["vocab_size"], (2, 1))
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        torch.testing.assert_close(
            laid(step, attention_mask=mask), plain(step, attention_mask=mask), atol=1e-5, rtol=0
        )


def test_cpu_layout_strides_and_tied_head() -> None:
    part = load_part(fixtures.tiny_checkpoint("llama-tied"), "f")
    attn, mlp = part.layers[0].self_attn, part.layers[0].mlp
    q_out, kv_out = attn.q_proj.out_features, attn.k_proj.out_features
    assert attn.q_proj.weight.stride() == (1, q_out + 2 * kv_out)  # (in, q | k | v) contiguous
    assert mlp.gate_proj.weight.stride() == (1, 2 * mlp.gate_proj.out_features)
    assert attn.o_proj.weight.stride() == (1, attn.o_proj.out_features)  # square: column-major
    assert mlp.down_proj.weight.is_contiguous()  # narrow: stays row-major
    if part.config.tie_word_embeddings:
        assert part.lm_head.weight is part.embed_tokens.weight
        assert part.lm_head.weight.stride() == (1, part.config.vocab_size)


def test_row_major_layout_groups_without_transposing() -> None:
    plain = load_part(fixtures.tiny_checkpoint("qwen2"), "f", decode_layout=False)
    ref = {k: v.clone() for k, v in plain.state_dict().items()}
    decode_layout(plain, column_major=False)
    attn = plain.layers[0].self_attn
    assert is_fused((attn.q_proj, attn.k_proj, attn.v_proj))
    assert attn.q_proj.weight.is_contiguous() and attn.o_proj.weight.is_contiguous()
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None
    assert attn.k_proj.bias.data_ptr() == attn.q_proj.bias.data_ptr() + attn.q_proj.bias.nbytes
    for key, value in plain.state_dict().items():
        assert torch.equal(value, ref[key]), key


def test_swapped_weights_fall_back_to_one_matmul_each() -> None:
    part = load_part(fixtures.tiny_checkpoint("llama-tied"), "f")
    attn = part.layers[0].self_attn
    group = (attn.q_proj, attn.k_proj, attn.v_proj)
    x = torch.randn(2, 3, attn.q_proj.in_features)
    assert attn.fused is not None and attn.fused.views(group) is not None
    with torch.inference_mode():
        before = linear_group(x, group, attn.fused)
        attn.k_proj.weight = nn.Parameter(attn.k_proj.weight.detach().clone())  # as llm_offload does
        assert not is_fused(group) and attn.fused.views(group) is None
        after = linear_group(x, group, attn.fused)
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_copies_and_pickles_of_a_laid_out_part_compute_the_same() -> None:
    import copy
    import io

    part = load_part(fixtures.tiny_checkpoint("llama-tied"), "f")
    buffer = io.BytesIO()
    torch.save(part, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)  # our own bytes, written just above
    ids = torch.randint(3, 200, (1, 6))
    with torch.inference_mode():
        ref = part(ids)
        for other in (copy.deepcopy(part), loaded):
            torch.testing.assert_close(other(ids), ref, atol=1e-5, rtol=0)


def test_gradients_do_not_take_the_fused_path() -> None:
    part = load_part(fixtures.tiny_checkpoint("llama-tied"), "f")
    for p in part.parameters():
        p.requires_grad_(True)
    mlp = part.layers[0].mlp
    x = torch.randn(1, 2, mlp.gate_proj.in_features)
    mlp(x).sum().backward()
    expected = torch.autograd.grad(
        mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)).sum(), mlp.gate_proj.weight
    )[0]
    assert mlp.gate_proj.weight.grad is not None
    torch.testing.assert_close(mlp.gate_proj.weight.grad, expected)


def test_laid_out_part_owns_its_memory() -> None:
    """The streaming load copies every tensor out of the checkpoint's memory maps (so they can close);
    without the layout the part keeps zero-copy views of them."""
    path = fixtures.tiny_checkpoint("llama")
    laid = load_part(path, "b 0-2")
    plain = load_part(path, "b 0-2", decode_layout=False)
    mapped = Checkpoint(path).load("b 0-2")
    mapped_ptrs = {
        t.data_ptr() for t in [*mapped.begin.values(), *(v for d in mapped.mid.values() for v in d.values())]
    }
    assert not any(p.data_ptr() in mapped_ptrs for p in laid.parameters())
    assert all(p.device.type == "cpu" for p in laid.parameters())
    assert plain.layers[0].mlp.down_proj.weight.is_contiguous()


def test_load_part_layout_reports_a_missing_tensor(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file, save_file

    src = fixtures.tiny_checkpoint("llama")
    dst = tmp_path / "ckpt"
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            tensors = load_file(f)
            tensors = {k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k}
            save_file(tensors, dst / f.name)
        elif f.name.endswith(".index.json"):
            index = json.loads(f.read_text())
            index["weight_map"] = {
                k: v for k, v in index["weight_map"].items() if "layers.1.mlp.up_proj" not in k
            }
            (dst / f.name).write_text(json.dumps(index))
        elif f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    with pytest.raises(KeyError, match=r"'mlp.up_proj.weight' of layer 1 is missing"):
        load_part(dst, "f")


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 16, 17, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_f_linear_for_any_rows_and_layout(rows: int, bias: bool) -> None:
    weight = torch.randn(48, 24)
    b = torch.randn(48) if bias else None
    x = torch.randn(rows, 1, 24)
    want = torch.nn.functional.linear(x, weight, b)
    for w in (weight, weight.t().contiguous().t()):  # row-major, column-major
        got = linear(x, w, b)
        assert got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_setup_cache_lays_the_part_out_for_its_batch_size() -> None:
    path = fixtures.tiny_checkpoint("llama-tied")
    part = load_part(path, "f")
    ref = {k: v.clone() for k, v in part.state_dict().items()}
    attn = part.layers[0].self_attn
    ids = torch.randint(3, 200, (4, 6))
    with torch.inference_mode():
        stateless = part(ids)
        part.setup_cache(4, 16)  # several rows: row-major (W @ x.T is faster)
        assert attn.q_proj.weight.stride(-1) == 1 and attn.o_proj.weight.is_contiguous()
        assert is_fused((attn.q_proj, attn.k_proj, attn.v_proj))
        assert part.lm_head.weight is part.embed_tokens.weight and part.lm_head.weight.is_contiguous()
        torch.testing.assert_close(part(ids), stateless, atol=1e-5, rtol=0)
        part.setup_cache(1, 16)  # one row: column-major again
        assert attn.q_proj.weight.stride(-1) != 1 and part.lm_head.weight.stride(-1) != 1
        torch.testing.assert_close(part(ids[:1]), stateless[:1], atol=1e-5, rtol=0)
    for key, value in part.state_dict().items():
        assert torch.equal(value, ref[key]), key


def test_setup_cache_leaves_swapped_weights_alone() -> None:
    part = load_part(fixtures.tiny_checkpoint("llama-tied"), "f")
    mlp = part.layers[1].mlp
    mine = nn.Parameter(mlp.up_proj.weight.detach().clone())
    mlp.up_proj.weight = mine  # as llm_offload swaps a streamed layer's weights
    o_proj = part.layers[0].self_attn.o_proj.weight
    part.setup_cache(4, 16)
    assert mlp.up_proj.weight is mine and part.layers[0].self_attn.o_proj.weight is o_proj


def test_bf16_parts_group_but_stay_row_major() -> None:
    """Column-major is measured faster for fp32 only (bf16 matmuls on it run 10x slower on the CPU)."""
    path = fixtures.tiny_checkpoint("llama-tied")
    part = load_part(path, "f", dtype=torch.bfloat16)
    plain = load_part(path, "f", dtype=torch.bfloat16, decode_layout=False)
    attn = part.layers[0].self_attn
    assert is_fused((attn.q_proj, attn.k_proj, attn.v_proj))
    assert all(p.stride(-1) == 1 for p in part.parameters() if p.dim() == 2)
    ids = torch.randint(3, 200, (2, 6))
    with torch.inference_mode():
        part.setup_cache(1, 16)
        assert all(p.stride(-1) == 1 for p in part.parameters() if p.dim() == 2)
        torch.testing.assert_close(part(ids[:1]), plain(ids[:1]), atol=2e-2, rtol=0)
