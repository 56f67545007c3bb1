"""q/k/v and gate/up stored fused at build time: HF's names and shapes in state dicts, the checkpoint's
values, one matmul per group, copies and pickles that keep it, safetensors saving, and a matmul chosen per
call (the same storage for every batch size)."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
from parts_testlib import fixtures, left_padded
from safetensors.torch import load_file, save_file

from llm_model_parts import load_part
from llm_model_parts.layers.fused import join
from llm_model_parts.layers.linear import linear
from llm_sepweight import Checkpoint

NAMES = ["llama", "llama-tied", "qwen2", "phi3", "gemma3_text", "gptj", "opt"]


def _checkpoint_tensors(path) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    sd = Checkpoint(path).load("f")
    out = {f"layers.{i}.{k}": v for i, layer in sd.mid.items() for k, v in layer.items()}
    return {**sd.begin, **out, **sd.end}


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_has_hf_names_shapes_and_the_checkpoint_values(name: str) -> None:
    path = fixtures.tiny_checkpoint(name)
    part = load_part(path, "f")
    stored = _checkpoint_tensors(path)
    sd = part.state_dict()
    assert set(sd) == set(stored) or set(sd) - set(stored) <= {"lm_head.weight"}
    for key, value in stored.items():
        if key in sd:
            assert sd[key].shape == value.shape and torch.equal(sd[key], value.to(sd[key].dtype)), key
    names = {n for n, _ in part.named_parameters()}
    if name not in ("phi3",):  # Phi-3 stores qkv_proj / gate_up_proj itself
        assert any("qkv_proj" in n for n in names) and not any("q_proj" in n for n in names)


def test_a_group_runs_as_one_matmul() -> None:
    part = load_part(fixtures.tiny_checkpoint("llama"), "f")
    calls: list[str] = []
    for name, module in part.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, a, o, name=name: calls.append(name))
    with torch.inference_mode():
        part(torch.randint(3, 200, (1, 4)))
    layer0 = [c for c in calls if c.startswith("layers.0.")]
    assert layer0 == [
        "layers.0.self_attn.qkv_proj",
        "layers.0.self_attn.o_proj",
        "layers.0.mlp.gate_up_proj",
        "layers.0.mlp.down_proj",
    ]


def test_copies_pickles_and_safetensors_round_trips_compute_the_same(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = fixtures.tiny_checkpoint("llama-tied")
    part = load_part(path, "f")
    buffer = io.BytesIO()
    torch.save(part, buffer)
    buffer.seek(0)
    pickled = torch.load(buffer, weights_only=False)  # our own bytes, written just above
    saved = tmp_path / "part.safetensors"
    save_file({k: v.clone() for k, v in part.state_dict().items()}, saved)  # HF names, own storage each
    reloaded = load_part(path, "f")
    reloaded.load_state_dict(load_file(saved))
    ids = torch.randint(3, 200, (2, 6))
    with torch.inference_mode():
        ref = part(ids)
        for other in (copy.deepcopy(part), pickled, reloaded):
            assert any("qkv_proj" in n for n, _ in other.named_parameters())
            torch.testing.assert_close(other(ids), ref, atol=0, rtol=0)


def test_switching_batch_sizes_allocates_no_weight_memory() -> None:
    part = load_part(fixtures.tiny_checkpoint("llama-tied"), "f")
    ptrs = {n: p.data_ptr() for n, p in part.named_parameters()}
    ids = torch.randint(3, 200, (4, 6))
    with torch.inference_mode():
        stateless = part(ids)
        for rows in (4, 1, 2):
            cache = part.new_cache(rows, 16)
            torch.testing.assert_close(part(ids[:rows], cache), stateless[:rows], atol=1e-5, rtol=0)
    assert {n: p.data_ptr() for n, p in part.named_parameters()} == ptrs


def test_join_is_a_view_when_back_to_back_and_a_copy_otherwise() -> None:
    buffer = torch.randn(10, 4)
    a, b = buffer[:6], buffer[6:]
    joined = join([a, b])
    assert joined.data_ptr() == buffer.data_ptr() and torch.equal(joined, buffer)
    apart = join([buffer[6:], buffer[:6]])
    assert apart.data_ptr() != buffer.data_ptr() and torch.equal(apart, torch.cat([buffer[6:], buffer[:6]]))


def test_gradients_flow_into_the_fused_parameter() -> None:
    part = load_part(fixtures.tiny_checkpoint("llama"), "f")
    mlp = part.layers[0].mlp
    weight = mlp.gate_up_proj.weight
    weight.requires_grad_(True)
    x = torch.randn(1, 2, mlp.gate_up_proj.in_features)
    mlp(x).sum().backward()
    gate = weight.detach()[: weight.shape[0] // 2].clone().requires_grad_(True)
    up = weight.detach()[weight.shape[0] // 2 :].clone().requires_grad_(True)
    down = mlp.down_proj.weight.detach()
    (torch.nn.functional.silu(x @ gate.T) * (x @ up.T) @ down.T).sum().backward()
    assert weight.grad is not None and gate.grad is not None and up.grad is not None
    torch.testing.assert_close(weight.grad, torch.cat([gate.grad, up.grad]), atol=1e-5, rtol=0)


def test_load_part_reports_a_missing_tensor_by_hf_name(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = fixtures.tiny_checkpoint("llama")
    dst = tmp_path / "ckpt"
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            tensors = {k: v for k, v in load_file(f).items() if "layers.1.mlp.up_proj" not in k}
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


def test_load_part_owns_its_memory() -> None:
    """The load copies every tensor out of the checkpoint's memory maps, so they can close."""
    path = fixtures.tiny_checkpoint("llama")
    part = load_part(path, "b 0-2")
    mapped = Checkpoint(path).load("b 0-2")
    ptrs = {
        t.data_ptr() for t in [*mapped.begin.values(), *(v for d in mapped.mid.values() for v in d.values())]
    }
    assert not any(p.data_ptr() in ptrs for p in part.parameters())


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 16, 17, 40, 64, 65, 130])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_f_linear_for_any_rows(rows: int, bias: bool) -> None:
    for out in (48, 400):  # an ordinary projection, and a head far wider than its input
        weight = torch.randn(out, 24)
        b = torch.randn(out) if bias else None
        x = torch.randn(rows, 1, 24)
        want = torch.nn.functional.linear(x, weight, b)
        for w in (weight, weight.t().contiguous().t()):  # row-major, and a strided weight someone passes
            got = linear(x, w, b)
            assert got.shape == want.shape and got.is_contiguous()
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_bf16_parts_compute_like_their_fp32_selves() -> None:
    path = fixtures.tiny_checkpoint("llama-tied")
    ids, mask = left_padded(200, [6, 4])
    with torch.inference_mode():
        ref = load_part(path, "f")(ids, attention_mask=mask)
        got = load_part(path, "f", dtype=torch.bfloat16)(ids, attention_mask=mask)
    torch.testing.assert_close(got.float()[mask.bool()], ref[mask.bool()], atol=5e-2, rtol=0)
