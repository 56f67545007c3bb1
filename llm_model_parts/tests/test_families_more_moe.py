"""Mixture-of-experts edge cases, multimodal embeddings entering a part chain, and llm_sepweight conversion of
the second-wave families."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from parts_testlib import TINY_CONFIGS, fixtures, hf_positions, left_padded
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from llm_model_parts import chain, load_part
from llm_model_parts.layers.moe import dispatch

TOL = 1e-4


def stored_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as stored (transformers 5 fuses some MoE experts in memory, not on disk)."""
    from safetensors.torch import load_file

    return {k: v for shard in sorted(path.glob("*.safetensors")) for k, v in load_file(shard).items()}


def test_dispatch_equals_a_dense_loop_with_unused_experts() -> None:
    """Reference: every token through every expert it chose, summed with its weight (a plain loop)."""
    torch.manual_seed(0)
    n, k, e, hidden = 5, 2, 16, 8  # more experts than tokens: at least 6 experts get no token
    experts = [torch.nn.Linear(hidden, hidden) for _ in range(e)]
    x = torch.randn(n, hidden)
    index = torch.stack([torch.randperm(4)[:k] * 3 for _ in range(n)])  # only experts 0, 3, 6, 9 ever used
    weights = torch.rand(n, k)
    calls: list[int] = []

    def run(i: int, rows: torch.Tensor) -> torch.Tensor:
        calls.append(i)
        return experts[i](rows)

    with torch.no_grad():
        out = dispatch(x, index, weights, run, e)
        ref = torch.stack(
            [sum(weights[t, j] * experts[int(index[t, j])](x[t]) for j in range(k)) for t in range(n)]
        )
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert sorted(calls) == sorted(set(index.flatten().tolist()))  # each used expert runs once, unused never


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "deepseek_v3", "llama4_text"])
def test_a_layer_range_loads_only_its_experts(name: str) -> None:
    path = fixtures.tiny_checkpoint(name)
    part = load_part(path, "1-2")
    names = list(part.state_dict())
    assert names and all(n.startswith("layers.0.") for n in names)
    stored = 0
    for shard in path.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            stored += sum(1 for key in f.keys() if ".layers.1." in key)  # noqa: SIM118
    assert len(names) == stored  # every tensor of layer 1, and nothing of another layer


def test_deepseek_score_correction_bias_steers_routing() -> None:
    """The tiny checkpoint stores a zero `e_score_correction_bias` (a buffer HF initialises to 0); give it
    real values in both models: routing changes and we still match."""
    path = fixtures.tiny_checkpoint("deepseek_v3")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    part = load_part(path, "f")
    ids, mask = left_padded(256, [12, 9])
    with torch.inference_mode():
        before = part(ids, attention_mask=mask)
        g = torch.Generator().manual_seed(1)
        for hf_layer, layer in zip(hf.model.layers, part.layers, strict=True):
            if hasattr(hf_layer.mlp, "gate"):
                bias = torch.rand(hf_layer.mlp.gate.e_score_correction_bias.shape, generator=g) * 0.5
                hf_layer.mlp.gate.e_score_correction_bias.copy_(bias)
                layer.mlp.gate.e_score_correction_bias.copy_(bias)
        ref = hf(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
        after = part(ids, attention_mask=mask)
    real = mask.bool()
    assert (after - before)[real].abs().max() > 1e-3
    torch.testing.assert_close(after[real], ref[real], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["llama4_text", "gpt2", "qwen2_moe"])
def test_image_embeddings_enter_the_chain_like_hf_inputs_embeds(name: str) -> None:
    """A vision tower's output merged at image-token positions: our begin part takes (embeds, mask), HF takes
    the merged `inputs_embeds`; a chain of parts gives HF's logits."""
    path = fixtures.tiny_checkpoint(name)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    config = json.loads((path / "config.json").read_text())
    n = config.get("num_hidden_layers", config.get("n_layer"))
    parts = chain([load_part(path, "b 0-1"), load_part(path, f"1-{n} e")])
    ids, mask = left_padded(256, [10, 8])
    image = torch.zeros_like(ids, dtype=torch.bool)
    image[0, 4:7], image[1, 5:8] = True, True
    width = hf.get_input_embeddings().weight.shape[1]
    vision = torch.randn(int(image.sum()), width)
    with torch.inference_mode():
        merged = hf.get_input_embeddings()(ids).masked_scatter(image[..., None], vision)
        ref = hf(inputs_embeds=merged, attention_mask=mask, position_ids=hf_positions(mask)).logits
        first = parts.parts[0](ids, attention_mask=mask, inputs_embeds=(vision, image))
        out = parts.parts[1](first, attention_mask=mask)
        full = parts.parts[0](None, attention_mask=mask, inputs_embeds=merged)
        out_full = parts.parts[1](full, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=TOL, rtol=0)
    torch.testing.assert_close(out_full[real], ref[real], atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="marked positions"):
        parts.parts[0](ids, inputs_embeds=(vision[:-1], image))
    with pytest.raises(ValueError, match="image_token_id"):
        parts.parts[0](ids, inputs_embeds=vision)
    # embeds alone go where the ids hold the config's image token (here one past the text vocabulary)
    from llm_model_parts import Part

    begin = Part.from_config({**config, "image_token_id": 256}, "b 0-1", stored_tensors(path))
    with torch.inference_mode():
        by_token = begin(ids.masked_fill(image, 256), attention_mask=mask, inputs_embeds=vision)
    torch.testing.assert_close(
        by_token, first, atol=1e-6, rtol=0
    )  # two loads: other alignment, other summation order


SEPWEIGHT = [
    "falcon-7b-style",
    "falcon-40b-style",
    "gpt2",
    "gptj",
    "opt-350m-style",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v3",
    "llama4_text",
]


@pytest.mark.parametrize("name", [n for n in SEPWEIGHT if n in TINY_CONFIGS])
def test_llm_sepweight_converts_and_parts_load_from_it(name: str, tmp_path: Path) -> None:
    from llm_sepweight import convert

    path = fixtures.tiny_checkpoint(name)
    out = convert(path, tmp_path / "sw", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    n = manifest["num_layers"]
    ids, mask = left_padded(256, [9, 6])
    with torch.inference_mode():
        ref = load_part(path, "f")(ids, attention_mask=mask)
        parts = chain([load_part(out, "b 0-2"), load_part(out, f"2-{n} e")])
        got = parts(ids, attention_mask=mask)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "opt-350m-style", "falcon-7b-style", "gptj"])
def test_from_config_takes_a_flat_hf_state_dict(name: str) -> None:
    """`Part.from_config(config, spec, hf_model.state_dict())` for families whose names are not Llama's."""
    from llm_model_parts import Part

    path = fixtures.tiny_checkpoint(name)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    config = json.loads((path / "config.json").read_text())
    n = config.get("num_hidden_layers", config.get("n_layer"))
    state = hf.state_dict()
    parts = chain([Part.from_config(config, "b 0-1", state), Part.from_config(config, f"1-{n} e", state)])
    ids, mask = left_padded(256, [9, 6])
    with torch.inference_mode():
        ref = hf(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
        got = parts(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=TOL, rtol=0)
