"""config.json in both dialects: transformers 5 (`rope_parameters`) and before (`rope_theta`, `rope_scaling`).

The real fixtures are of the new kind; most checkpoints users bring are of the old one. Each old-dialect
file here is rewritten from a fixture, and the part built from it must equal transformers reading it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from parts_testlib import fixtures, hf_positions, left_padded
from transformers import AutoModelForCausalLM

from llm_model_parts import ModelConfig, load_part


def to_old_dialect(config: dict[str, Any]) -> dict[str, Any]:
    """What a pre-transformers-5 `config.json` of the same model looked like."""
    old = {k: v for k, v in config.items() if k not in ("rope_parameters", "transformers_version", "dtype")}
    old["torch_dtype"] = "float32"
    params = config.get("rope_parameters") or {}
    if config["model_type"] == "gemma3_text":
        old["rope_theta"] = params["full_attention"]["rope_theta"]
        old["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
        scaling = {k: v for k, v in params["full_attention"].items() if k != "rope_theta"}
        old["rope_scaling"] = None if scaling.get("rope_type") == "default" else scaling
        old.pop("layer_types")  # old files had only the pattern
        old["sliding_window_pattern"] = 2
        return old
    old["rope_theta"] = params.get("rope_theta", 10000.0)
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling.get("rope_type", "default") == "default":
        old["rope_scaling"] = None
    else:
        scaling["type"] = scaling.pop("rope_type")  # the oldest files said "type"
        old["rope_scaling"] = scaling
    return old


def rewrite(name: str, tmp_path: Path) -> Path:
    src = fixtures.tiny_checkpoint(name)
    dst = tmp_path / name
    shutil.copytree(src, dst)
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(to_old_dialect(config), indent=2))
    return dst


@pytest.mark.parametrize(
    "name",
    [
        "llama-yarn",
        "llama-llama3",
        "llama-dynamic",
        "llama-linear",
        "phi3-longrope",
        "gemma3_text",
        "mistral",
    ],
)
def test_old_dialect_equals_new_and_transformers(name: str, tmp_path: Path) -> None:
    new_dir, old_dir = fixtures.tiny_checkpoint(name), rewrite(name, tmp_path)
    new_cfg = ModelConfig.from_hf(json.loads((new_dir / "config.json").read_text()))
    old_cfg = ModelConfig.from_hf(json.loads((old_dir / "config.json").read_text()))
    assert old_cfg.rope_parameters == new_cfg.rope_parameters
    assert old_cfg.layer_types == new_cfg.layer_types
    hf_old = AutoModelForCausalLM.from_pretrained(old_dir, dtype=torch.float32).eval()
    part = load_part(old_dir, "f")
    length = 70 if "longrope" in name else 40  # past the original / max length of the scaled RoPEs
    ids, mask = left_padded(256, [length, length - 9])
    with torch.inference_mode():
        ref = hf_old(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
        got = part(ids, attention_mask=mask)
        new = load_part(new_dir, "f")(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(got, new, atol=0, rtol=0)


def test_phi3_su_alias_and_top_level_original_length() -> None:
    config = json.loads((fixtures.tiny_checkpoint("phi3-longrope") / "config.json").read_text())
    old = to_old_dialect(config)
    old["rope_scaling"]["type"] = "su"
    parsed = ModelConfig.from_hf(old)
    rope = parsed.rope_parameters["full_attention"]
    assert rope.rope_type == "longrope"
    assert rope.original_max_position_embeddings == 64


def test_qwen2_sliding_layers_from_max_window_layers() -> None:
    config = json.loads((fixtures.tiny_checkpoint("qwen2-sliding") / "config.json").read_text())
    config.pop("layer_types", None)
    parsed = ModelConfig.from_hf(config)
    assert parsed.layer_types == ("full_attention",) * 2 + ("sliding_attention",) * 2
    assert parsed.sliding_window == 8


def test_mistral_null_window_means_full_attention() -> None:
    config = json.loads((fixtures.tiny_checkpoint("mistral") / "config.json").read_text())
    assert ModelConfig.from_hf({**config, "layer_types": None, "sliding_window": None}).sliding_window is None
    parsed = ModelConfig.from_hf({**config, "layer_types": None})
    assert set(parsed.layer_types) == {"sliding_attention"} and parsed.sliding_window == 8


def test_real_checkpoints_read_as_transformers_5_dialect() -> None:
    gemma = ModelConfig.from_hf(json.loads((fixtures.real_checkpoint("gemma3") / "config.json").read_text()))
    assert gemma.rope_parameters["full_attention"].rope_theta == 1_000_000.0
    assert gemma.rope_parameters["sliding_attention"].rope_theta == 10_000.0
    assert gemma.layer_types.count("full_attention") == 3 and gemma.sliding_window == 512
    smol = ModelConfig.from_hf(json.loads((fixtures.real_checkpoint("smollm2") / "config.json").read_text()))
    assert smol.rope_parameters["full_attention"].rope_theta == 100_000.0 and smol.tie_word_embeddings


@pytest.mark.parametrize("name", ["gemma3_text", "phi3-longrope"])
def test_sepweight_directory_loads_like_the_hf_checkpoint(name: str, tmp_path: Path) -> None:
    """A part loaded from an llm_sepweight directory equals one loaded from the HF checkpoint."""
    from llm_sepweight import convert

    src = fixtures.tiny_checkpoint(name)
    out = convert(src, tmp_path / "sw", progress=False)
    ids = torch.randint(3, 256, (2, 9))
    with torch.inference_mode():
        ref = load_part(src, "f")(ids)
        got = [load_part(out, spec) for spec in ("b 0-2", "2-4 e")]
        torch.testing.assert_close(got[1](got[0](ids)), ref, atol=0, rtol=0)
