"""Bad input fails early with the tensor, field or argument named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from parts_testlib import fixtures

from llm_model_parts import ModelConfig, Part, chain, load_part, supported_architectures


def config_of(name: str) -> dict:
    return json.loads((fixtures.tiny_checkpoint(name) / "config.json").read_text())


def hf_state_dict(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(fixtures.tiny_checkpoint(name).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_supported_architectures_lists_the_families() -> None:
    assert {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text"} <= set(supported_architectures())


def test_unsupported_model_type_names_it_and_lists_supported() -> None:
    config = {**config_of("llama"), "model_type": "bloomz_future"}
    with pytest.raises(ValueError, match=r"'bloomz_future'.*supported: .*llama"):
        ModelConfig.from_hf(config)


def test_unknown_rope_type_names_the_field() -> None:
    config = {**config_of("llama"), "rope_parameters": {"rope_type": "spiral", "rope_theta": 1e4}}
    with pytest.raises(ValueError, match=r"rope_parameters\.rope_type.*'spiral'"):
        Part.from_config(config, "f", hf_state_dict("llama"))
    old = {**config_of("llama"), "rope_scaling": {"type": "spiral", "factor": 2.0}}
    old.pop("rope_parameters", None)
    with pytest.raises(ValueError, match=r"rope_scaling\.rope_type.*'spiral'"):
        ModelConfig.from_hf(old)


def test_missing_rope_field_is_named() -> None:
    config = {**config_of("llama"), "rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}
    with pytest.raises(ValueError, match=r"rope_parameters\.factor"):
        ModelConfig.from_hf(config)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    weights = hf_state_dict("qwen2")
    del weights["model.layers.2.self_attn.k_proj.bias"]
    with pytest.raises(KeyError, match=r"self_attn\.k_proj\.bias.*layer 2"):
        Part.from_config(config_of("qwen2"), "1-3", weights)


def test_wrong_shape_is_named() -> None:
    weights = hf_state_dict("llama")
    weights["model.layers.0.mlp.up_proj.weight"] = torch.zeros(127, 64)
    with pytest.raises(ValueError, match=r"mlp\.up_proj\.weight.*layer 0.*\(127, 64\).*\(128, 64\)"):
        Part.from_config(config_of("llama"), "b 0-1", weights)


def test_unexpected_tensor_means_config_mismatch() -> None:
    weights = hf_state_dict("llama-mqa-bias")  # has q/k/v/o biases
    config = {**config_of("llama-mqa-bias"), "attention_bias": False}
    with pytest.raises(KeyError, match=r"bias.*not a tensor"):
        Part.from_config(config, "0-2", weights)


def test_missing_tensor_in_checkpoint_dir_fails_at_load(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    src = fixtures.tiny_checkpoint("llama")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        tensors = load_file(f)
        if "model.norm.weight" in tensors:
            del tensors["model.norm.weight"]
            save_file(tensors, f, metadata={"format": "pt"})
            index = json.loads((dst / "model.safetensors.index.json").read_text())
            del index["weight_map"]["model.norm.weight"]
            (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KeyError, match=r"norm\.weight"):
        load_part(dst, "3-4 e")


def test_token_ids_out_of_vocabulary() -> None:
    part = Part.from_config(config_of("llama"), "b 0-1")
    with pytest.raises(ValueError, match=r"token id 256 .*vocab_size=256"):
        part(torch.tensor([[5, 256]]))
    with pytest.raises(ValueError, match=r"token id -1"):
        part(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="token ids"):
        part(torch.zeros(1, 3, 64))


def test_hidden_states_of_wrong_width() -> None:
    part = Part.from_config(config_of("llama"), "1-2")
    with pytest.raises(ValueError, match=r"hidden states \(B, T, 64\).*\(1, 3, 32\)"):
        part(torch.zeros(1, 3, 32))
    with pytest.raises(ValueError, match="hidden states"):
        part(torch.tensor([[1, 2, 3]]))


def test_attention_mask_must_cover_the_sequence() -> None:
    part = Part.from_config(config_of("llama"), "f")
    with pytest.raises(ValueError, match=r"attention_mask.*\(1, 4\)"):
        part(torch.tensor([[5, 6, 7, 8]]), attention_mask=torch.ones(1, 3, dtype=torch.long))


def test_chain_rejects_gaps_and_misplaced_ends() -> None:
    config = config_of("llama")
    a, b = Part.from_config(config, "b 0-1"), Part.from_config(config, "2-4 e")
    with pytest.raises(ValueError, match="without gaps"):
        chain([a, b])
    with pytest.raises(ValueError, match="first part must hold begin"):
        Part.from_config(config, "1-4 e").as_forward_func()


def test_spec_outside_the_model() -> None:
    with pytest.raises(ValueError, match="0-9"):
        Part.from_config(config_of("llama"), "0-9")
