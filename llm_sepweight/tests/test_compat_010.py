"""llm-sepweight 0.10's own tests and its MICROLIB.md examples, restated against this package.

0.10's tests (tests/test_part_spec.py, tests/test_loading.py) and the examples of its MICROLIB.md and of
llm_falcon_model (its one published user) are rewritten here as behaviours, on small synthetic checkpoints
with Falcon's names. The deliberate differences are in the README ("Upgrading from 0.10") and tested at the end.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import llm_sepweight
from llm_sepweight.part_state_dict import PartSpec, PartStateDict

N_LAYERS = 6


def falcon_like_decider(key: str) -> list[str]:
    """Falcon's layout: `transformer.word_embeddings`, `transformer.h.<i>.*`, `transformer.ln_f`, `lm_head`."""
    name = key.removeprefix("transformer.")
    if name.startswith("word_embeddings."):
        return ["start", name]
    if name.startswith("h."):
        _, layer, rest = name.split(".", 2)
        return ["mid", layer, rest]
    return ["end", name]


def falcon_like_state(n_layers: int = N_LAYERS, width: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(n_layers)
    state = {"transformer.word_embeddings.weight": torch.randn(10, width, generator=gen)}
    for i in range(n_layers):
        state[f"transformer.h.{i}.self_attention.query_key_value.weight"] = torch.randn(
            3 * width, width, generator=gen
        )
        state[f"transformer.h.{i}.input_layernorm.weight"] = torch.randn(width, generator=gen)
    state["transformer.ln_f.weight"] = torch.randn(width, generator=gen)
    state["lm_head.weight"] = torch.randn(10, width, generator=gen)
    return state


@pytest.fixture(scope="module")
def sw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compat010") / "sw"
    llm_sepweight.dump(decider=falcon_like_decider, state_dict=falcon_like_state(), out_path=out)
    return out


# --- 0.10 tests/test_part_spec.py ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, begin, mid, end",
    [
        ("b", True, [], False),
        ("e", False, [], True),
        ("b 0-5", True, [range(0, 5)], False),
        ("55-60 e", False, [range(55, 60)], True),
        ("0-5 50-55", False, [range(0, 5), range(50, 55)], False),
        ("5-10 15-20 25-30", False, [range(5, 10), range(15, 20), range(25, 30)], False),
    ],
)
def test_part_spec_from_string_equals_the_0_10_fields(
    text: str, begin: bool, mid: list[range], end: bool
) -> None:
    spec = PartSpec.from_string(text)
    assert spec == PartSpec(begin=begin, mid=mid, end=end, is_full=False)
    assert spec == PartSpec(begin, mid, end, False)  # 0.10's positional order
    assert (spec.begin, spec.mid, spec.end, spec.is_full) == (begin, mid, end, False)


def test_full_spec_holds_begin_and_end_as_in_0_10() -> None:
    spec = PartSpec.from_string("f")
    assert (spec.begin, spec.mid, spec.end, spec.is_full) == (True, [], True, True)
    assert spec == PartSpec(begin=True, mid=[], end=True, is_full=True)


def test_part_spec_is_the_one_class_and_pickles() -> None:
    assert PartSpec is llm_sepweight.PartSpec
    spec = PartSpec.from_string("b 0-5 5-8")
    assert spec.mid == [range(0, 5), range(5, 8)] and spec.ranges == (range(0, 8),)
    assert pickle.loads(pickle.dumps(spec)) == spec


# --- 0.10 tests/test_loading.py ------------------------------------------------------------------------


def test_load_begin_only(sw: Path) -> None:
    state_dict = llm_sepweight.load(sw, "b").to_dict()
    assert list(state_dict) == ["begin.word_embeddings.weight"]


def test_load_full_has_every_tensor(sw: Path) -> None:
    state_dict = llm_sepweight.load(sw, "f").to_dict()
    assert len(state_dict) == len(falcon_like_state())
    assert "begin.word_embeddings.weight" in state_dict
    assert f"mid.{N_LAYERS - 1}.self_attention.query_key_value.weight" in state_dict


# --- MICROLIB.md: dumping --------------------------------------------------------------------------------


def test_dump_keeps_tensors_and_names(sw: Path) -> None:
    state = falcon_like_state()
    flat = llm_sepweight.load(sw, "f").to_dict()
    assert torch.equal(flat["mid.3.input_layernorm.weight"], state["transformer.h.3.input_layernorm.weight"])
    assert torch.equal(flat["end.lm_head.weight"], state["lm_head.weight"])


@pytest.mark.parametrize("extension", ["pth", "bin", ".pth"])
def test_convert_pth_files(tmp_path: Path, extension: str) -> None:
    from llm_sepweight.pth_conversion import convert_pth_files

    state = falcon_like_state()
    keys = sorted(state)
    src = tmp_path / "src"
    src.mkdir()
    suffix = extension.lstrip(".")
    torch.save({k: state[k] for k in keys[::2]}, src / f"pytorch_model-1.{suffix}")
    torch.save({k: state[k] for k in keys[1::2]}, src / f"pytorch_model-2.{suffix}")
    convert_pth_files(
        in_path=src, out_path=tmp_path / "out", decider=falcon_like_decider, extension=extension
    )
    flat = llm_sepweight.load(tmp_path / "out", "f").to_dict()
    assert len(flat) == len(state)
    assert torch.equal(flat["begin.word_embeddings.weight"], state["transformer.word_embeddings.weight"])


def test_convert_safetensors_files(tmp_path: Path) -> None:
    from llm_sepweight.safetensors_conversion import convert_safetensors_files

    state = falcon_like_state()
    keys = sorted(state)
    src = tmp_path / "src"
    src.mkdir()
    save_file({k: state[k] for k in keys[:5]}, str(src / "model-00001.safetensors"))
    save_file({k: state[k] for k in keys[5:]}, str(src / "model-00002.safetensors"))
    convert_safetensors_files(in_path=src, out_path=tmp_path / "out", decider=falcon_like_decider)
    flat = llm_sepweight.load(tmp_path / "out", "f").to_dict()
    assert sorted(flat) == sorted(llm_sepweight.load(_dumped(tmp_path, state), "f").to_dict())
    assert torch.equal(flat["end.ln_f.weight"], state["transformer.ln_f.weight"])


def _dumped(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    return llm_sepweight.dump(falcon_like_decider, state, tmp_path / "reference")


# --- MICROLIB.md: loading --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80 layers, for the MICROLIB examples '75-80 e' and '0-5 30-35'."""
    out = tmp_path_factory.mktemp("compat010_deep") / "sw"
    llm_sepweight.dump(falcon_like_decider, falcon_like_state(80, width=2), out)
    return out


@pytest.mark.parametrize(
    "spec, begin, layers, end",
    [
        ("b 0-5", True, range(0, 5), False),
        ("7-12", False, range(7, 12), False),
        ("75-80 e", False, range(75, 80), True),
    ],
)
def test_load_examples(deep: Path, spec: str, begin: bool, layers: range, end: bool) -> None:
    state_dict = llm_sepweight.load(path=deep, spec=spec).to_dict()
    assert ("begin.word_embeddings.weight" in state_dict) == begin
    assert ("end.lm_head.weight" in state_dict) == end
    got = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("mid.")})
    assert got == list(layers)


def test_to_dict_target_range_renames_onto_the_main_range(deep: Path) -> None:
    part_state_dict = llm_sepweight.load(path=deep, spec="0-5 30-35")
    assert isinstance(part_state_dict, PartStateDict)
    assert part_state_dict.main_range == range(0, 5)
    first = part_state_dict.to_dict(range(0, 5))
    assert sorted(first) == sorted(part_state_dict.to_dict())  # no target: the first range
    second = part_state_dict.to_dict(range(30, 35))
    assert sorted(second) == sorted(first)  # same module names ...
    layer_30 = part_state_dict.mid[30]["input_layernorm.weight"]
    assert second["mid.0.input_layernorm.weight"] is layer_30  # ... holding layers 30-34, already in memory


def test_full_main_range_is_every_layer(sw: Path) -> None:
    assert llm_sepweight.load(sw, "f").main_range == range(0, N_LAYERS)
    assert llm_sepweight.load(sw, "b").main_range is None
    assert llm_sepweight.load(sw, "2-4 e").main_range == range(2, 4)


def test_part_state_dict_0_10_constructor() -> None:
    layer = {"w": torch.ones(1)}
    psd = PartStateDict(None, {4: layer, 5: layer}, range(4, 6), {"n": torch.zeros(1)})
    assert sorted(psd.to_dict()) == ["end.n", "mid.4.w", "mid.5.w"]


def test_lazy_load_into_a_plain_module(tmp_path: Path) -> None:
    linear = nn.Linear(8, 4)
    state = {"begin.weight": torch.randn(4, 8), "h.0.weight": torch.randn(4, 8), "h.0.bias": torch.randn(4)}

    def decider(key: str) -> list[str]:
        return ["start", "embed"] if key.startswith("begin") else ["mid", "0", key.split(".", 2)[2]]

    out = llm_sepweight.dump(decider, state, tmp_path / "sw")
    module = nn.Linear(8, 4)
    llm_sepweight.lazy_load(module=module, path=out, spec="0-1")
    assert torch.equal(module.weight, state["h.0.weight"]) and torch.equal(module.bias, state["h.0.bias"])
    assert not torch.equal(linear.weight, module.weight)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_layernorm = nn.Module()
        self.input_layernorm.weight = nn.Parameter(torch.zeros(4))
        self.self_attention = nn.Module()
        self.self_attention.query_key_value = nn.Linear(4, 12, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.self_attention.query_key_value(x * self.input_layernorm.weight)[..., :4]


def _falcon_part(mid_range: range, begin: bool, end: bool) -> llm_sepweight.Part:
    def embed() -> nn.Module:
        m = nn.Module()
        m.word_embeddings = nn.Embedding(10, 4)
        return m

    def head() -> nn.Module:
        m = nn.Module()
        m.ln_f = nn.Module()
        m.ln_f.weight = nn.Parameter(torch.zeros(4))
        m.lm_head = nn.Linear(4, 10, bias=False)
        return m

    return llm_sepweight.Part(
        begin=embed if begin else None, mid=_Block, end=head if end else None, mid_range=mid_range
    )


@pytest.mark.parametrize("spec", ["2-4 e", "f", "b 0-3"])
def test_falcon_run_part_both_ways(sw: Path, spec: str) -> None:
    """llm_falcon_model's run_part: Part from `PartSpec.mid[0]` (or every layer for 'f'), then either way."""
    parsed = PartSpec.from_string(spec)
    mid_range = parsed.mid[0] if parsed.mid else range(N_LAYERS)
    loaded = _falcon_part(mid_range, parsed.begin, parsed.end)
    loaded.load_state_dict(llm_sepweight.load(sw, spec).to_dict())  # strict: every name lines up
    lazy = _falcon_part(mid_range, parsed.begin, parsed.end)
    llm_sepweight.lazy_load(lazy, sw, spec)
    for (k, a), (_, b) in zip(loaded.state_dict().items(), lazy.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_is_cpu_memory_less_than_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from llm_sepweight import utils

    assert llm_sepweight.is_cpu_memory_less_than_gpu is utils.is_cpu_memory_less_than_gpu
    assert utils.get_cpu_memory() > 0
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            llm_sepweight.is_cpu_memory_less_than_gpu("cuda:0")
    else:
        assert isinstance(llm_sepweight.is_cpu_memory_less_than_gpu("cuda:0"), bool)
    monkeypatch.setattr(utils, "get_gpu_memory", lambda device: 1e9)
    assert utils.is_cpu_memory_less_than_gpu("cuda:0")
    monkeypatch.setattr(utils, "get_gpu_memory", lambda device: 0.0)
    assert not utils.is_cpu_memory_less_than_gpu("cuda:0")


def test_0_10_module_paths() -> None:
    from llm_sepweight.dumping import dump
    from llm_sepweight.filenames import get_filenames
    from llm_sepweight.loading import lazy_load, load
    from llm_sepweight.part_module import Part

    assert (dump, get_filenames, lazy_load, load, Part) == (
        llm_sepweight.dump,
        llm_sepweight.get_filenames,
        llm_sepweight.lazy_load,
        llm_sepweight.load,
        llm_sepweight.Part,
    )
    assert get_filenames("b 0-2") == ["begin.safetensors", "mid.00000.safetensors", "mid.00001.safetensors"]


def test_reads_a_0_10_directory(tmp_path: Path) -> None:
    """0.10 wrote begin.pth / mid.NNNNN.pth (layer keys with or without the leading `h.<i>.`) / end.pth."""
    old = tmp_path / "old"
    old.mkdir()
    emb, w0, w1, head = (torch.randn(3, 2) for _ in range(4))
    torch.save({"word_embeddings.weight": emb}, old / "begin.pth")
    torch.save({"h.0.mlp.weight": w0}, old / "mid.00000.pth")
    torch.save({"mlp.weight": w1}, old / "mid.00001.pth")
    torch.save({"lm_head.weight": head}, old / "end.pth")
    flat = llm_sepweight.load(old, "f").to_dict()
    assert sorted(flat) == [
        "begin.word_embeddings.weight",
        "end.lm_head.weight",
        "mid.0.mlp.weight",
        "mid.1.mlp.weight",
    ]
    assert torch.equal(flat["mid.0.mlp.weight"], w0) and torch.equal(flat["mid.1.mlp.weight"], w1)


# --- deliberate differences (README, "Upgrading from 0.10") ---------------------------------------------


@pytest.mark.parametrize("text", ["0-5 3-8", "30-35 0-5", "5-5", "b x"])
def test_difference_bad_specs_raise_value_error(text: str) -> None:
    with pytest.raises(
        ValueError
    ):  # 0.10 accepted overlapping/unordered/empty ranges, or raised AssertionError
        PartSpec.from_string(text)


def test_difference_begin_may_start_past_layer_0() -> None:
    assert PartSpec.from_string("b 5-10").layers == tuple(range(5, 10))  # 0.10: AssertionError


def test_difference_lazy_load_that_matches_nothing_raises(sw: Path) -> None:
    with pytest.raises(ValueError, match="none of the"):
        llm_sepweight.lazy_load(nn.Linear(3, 3), sw, "0-1")  # 0.10 silently loaded nothing


def test_difference_to_dict_with_layers_not_loaded_raises(sw: Path) -> None:
    psd = llm_sepweight.load(sw, "0-2")
    with pytest.raises(ValueError, match="not loaded"):
        psd.to_dict(range(3, 5))  # 0.10: KeyError
    with pytest.raises(ValueError, match="do not fit"):
        psd.to_dict(range(0, 3))  # 0.10 silently dropped layers past main_range


def test_difference_get_filenames_f_needs_num_layers() -> None:
    with pytest.raises(ValueError, match="num_layers"):
        llm_sepweight.get_filenames("f")  # 0.10 returned begin and end only


# --- the same behaviours, asked of the original 0.10 wheel (in its own process) -------------------------

_ASK_ORIGINAL = """
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
import llm_sepweight
from llm_sepweight.part_state_dict import PartSpec, PartStateDict
assert llm_sepweight.__version__ == "0.10.0", llm_sepweight.__file__
specs = {}
for text in json.loads(sys.argv[2]):
    s = PartSpec.from_string(text)
    specs[text] = [s.begin, [[r.start, r.stop] for r in s.mid], s.end, s.is_full]
layers = {i: {"w": torch.tensor([float(i)])} for i in [*range(5), *range(30, 35)]}
flat = PartStateDict(begin=None, mid=layers, main_range=range(0, 5), end=None).to_dict(range(30, 35))
print(json.dumps({"specs": specs, "to_dict": {k: float(v) for k, v in flat.items()}}))
"""
_ASKED = ["b", "e", "b 0-5", "55-60 e", "0-5 50-55", "5-10 15-20 25-30", "f", "0-5 5-10"]


def test_same_answers_as_the_original_wheel() -> None:
    import json
    import subprocess
    import sys

    import fixtures

    try:
        original = fixtures.original_package("llm-sepweight==0.10.0")
    except Exception as e:  # no network and no cached wheel
        pytest.skip(f"the original 0.10 wheel is not available: {e}")
    done = subprocess.run(
        [sys.executable, "-c", _ASK_ORIGINAL, str(original), json.dumps(_ASKED)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    theirs = json.loads(done.stdout)
    for text in _ASKED:
        s = PartSpec.from_string(text)
        assert [s.begin, [[r.start, r.stop] for r in s.mid], s.end, s.is_full] == theirs["specs"][text], text
    layers = {i: {"w": torch.tensor([float(i)])} for i in [*range(5), *range(30, 35)]}
    ours = PartStateDict(None, layers, range(0, 5), None).to_dict(range(30, 35))
    assert {k: float(v) for k, v in ours.items()} == theirs["to_dict"]
