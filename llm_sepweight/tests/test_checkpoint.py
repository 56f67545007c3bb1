from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sw_helpers import TINY_NAMES, assert_same, expected_from_files, tiny

from llm_sepweight import Checkpoint, PartSpec, PartStateDict, convert, load


def _hf_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _check_against_transformers(ckpt: Checkpoint, model: torch.nn.Module, src: Path) -> None:
    """Every tensor of the part equals the checkpoint's, and what transformers loaded where it loads it unchanged."""
    outer, layers = expected_from_files(src, model, ckpt.num_layers)
    parts = ckpt.load("f")
    assert parts.begin is not None and parts.end is not None
    assert set(parts.begin).isdisjoint(parts.end)
    assert_same({**parts.begin, **parts.end}, outer, f"{ckpt.path} begin+end")
    assert any("emb" in k or k in ("wte.weight",) for k in parts.begin), sorted(parts.begin)
    for i, want in enumerate(layers):
        assert_same(parts.mid[i], want, f"{ckpt.path} layer {i}")
        assert_same(ckpt.layer_state_dict(i), want, f"{ckpt.path} layer_state_dict({i})")


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_hf_view_and_conversion_match_transformers(name: str, tmp_path: Path) -> None:
    src = tiny(name)
    model = _hf_model(src)
    hf = Checkpoint(src)
    assert hf.kind == "hf" and hf.num_layers == model.config.num_hidden_layers
    _check_against_transformers(hf, model, src)
    out = convert(src, tmp_path / "sw", progress=False)
    sw = Checkpoint(out)
    assert sw.kind == "sepweight" and sw.config == hf.config and sw.architecture == hf.architecture
    assert sw.tied_embeddings == hf.tied_embeddings
    sw.verify()
    _check_against_transformers(sw, model, src)


def test_smollm2_hf_and_sepweight(smollm2_hf: Path, smollm2_sepweight: Path) -> None:
    model = _hf_model(smollm2_hf)
    for path in (smollm2_hf, smollm2_sepweight):
        ckpt = Checkpoint(path)
        assert ckpt.architecture == "llama" and ckpt.num_layers == 30 and ckpt.tied_embeddings
        _check_against_transformers(ckpt, model, smollm2_hf)


def test_gemma3_hf_and_sepweight(gemma3_hf: Path, gemma3_sepweight: Path) -> None:
    model = _hf_model(gemma3_hf)
    for path in (gemma3_hf, gemma3_sepweight):
        ckpt = Checkpoint(path)
        assert ckpt.architecture == "gemma3_text" and ckpt.num_layers == 18 and ckpt.tied_embeddings
        _check_against_transformers(ckpt, model, gemma3_hf)


def test_part_loading_and_files(smollm2_sepweight: Path, smollm2_hf: Path) -> None:
    ckpt = Checkpoint(smollm2_sepweight)
    assert ckpt.files("b 0-2") == ["begin.safetensors", "mid.00000.safetensors", "mid.00001.safetensors"]
    assert ckpt.files("29-30 e") == ["mid.00029.safetensors", "end.safetensors"]
    part = load(smollm2_sepweight, "12-14 e")
    assert isinstance(part, PartStateDict)
    assert part.begin is None and sorted(part.mid) == [12, 13] and part.end is not None
    flat = part.to_dict()
    assert "mid.12.self_attn.q_proj.weight" in flat and "end.lm_head.weight" in flat
    assert "end.norm.weight" in flat and not any(k.startswith("begin.") for k in flat)
    hf = Checkpoint(smollm2_hf)
    assert hf.files("b 0-1") == ["model-00001-of-00004.safetensors"]
    same = hf.load(PartSpec(layers=(12, 13), end=True)).to_dict()
    assert sorted(same) == sorted(flat) and all(torch.equal(same[k], flat[k]) for k in flat)
    with pytest.raises(ValueError, match="'28-31'"):
        ckpt.load("28-31")
    with pytest.raises(IndexError):
        ckpt.layer_state_dict(30)


def test_tied_head_is_a_copy_of_the_embedding(smollm2_sepweight: Path) -> None:
    ckpt = Checkpoint(smollm2_sepweight)
    part = ckpt.load("b e")
    assert part.begin is not None and part.end is not None
    assert torch.equal(part.end["lm_head.weight"], part.begin["embed_tokens.weight"])
    assert ckpt.manifest is not None and ckpt.manifest["tied_embeddings"] is True


def test_dtype_on_load_and_convert(smollm2_sepweight: Path, smollm2_hf: Path, tmp_path: Path) -> None:
    ckpt = Checkpoint(smollm2_sepweight)
    fp32 = ckpt.layer_state_dict(3)
    bf16 = ckpt.layer_state_dict(3, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())
    assert all(torch.equal(bf16[k], fp32[k].to(torch.bfloat16)) for k in fp32)
    out = convert(smollm2_hf, tmp_path / "bf16", dtype=torch.bfloat16, progress=False)
    small = Checkpoint(out)
    assert sum((out / f).stat().st_size for f in small.files("f")) < 0.55 * sum(
        (smollm2_sepweight / f).stat().st_size for f in ckpt.files("f")
    )
    layer = small.layer_state_dict(3)
    assert all(torch.equal(layer[k], bf16[k]) for k in bf16)
    assert all(t.dtype == torch.float32 for t in small.layer_state_dict(3, dtype=torch.float32).values())


def test_device_transfer_logic_on_cpu(tmp_path: Path) -> None:
    """The one-copy-per-file path used for CUDA (pinned staging, device views), run on CPU."""
    from llm_sepweight.materialize import bulk_transfer

    ckpt = Checkpoint(convert(tiny("llama"), tmp_path / "sw", progress=False))
    want = ckpt.layer_state_dict(2)
    mapped = ckpt._open("mid.00002.safetensors")
    assert not isinstance(mapped, dict)
    infos = [(name, mapped.infos[name]) for name in mapped.infos]
    for dtype in (None, torch.bfloat16):
        got = bulk_transfer(mapped, infos, torch.device("cpu"), dtype, pin=False)
        assert sorted(got) == sorted(want)
        for k, t in want.items():
            assert torch.equal(got[k], t if dtype is None else t.to(dtype))
    few = infos[:1]  # a small part of the file: sent tensor by tensor instead
    got = bulk_transfer(mapped, few, torch.device("cpu"), None, pin=False)
    assert torch.equal(got[few[0][0]], want[few[0][0]])
