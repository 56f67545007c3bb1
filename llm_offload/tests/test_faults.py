"""Bad input and faults: the error reaches the caller naming the layer, no thread is left behind, and the
model works again afterwards."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from test_hf_parity import IDS, assert_same, layer_bytes, prefill_and_decode

from llm_offload import CpuSource, OffloadError, SepweightSource, offload

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def want(reference_llama: Any) -> list[torch.Tensor]:
    return prefill_and_decode(reference_llama, IDS, steps=1)


def readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("llm_offload")]


def busy(off: Any) -> list[Any]:
    return [s for s in off.scheduler.slots if s.future is not None and not s.future.done()]


def test_source_with_fewer_layers_than_modules(tiny_llama: Any, tiny_llama_sepweight: Path) -> None:
    src = SepweightSource(tiny_llama_sepweight, layers=[0, 1, 2])
    with pytest.raises(ValueError, match=r"holds 3 layers but 4 modules.*module 3"):
        offload(tiny_llama.model.layers, src, "cpu")


def test_layer_file_missing(tiny_llama: Any, tiny_llama_sepweight: Path, tmp_path: Path) -> None:
    d = tmp_path / "sw"
    shutil.copytree(tiny_llama_sepweight, d)
    (d / "mid.00002.safetensors").unlink()
    with pytest.raises(OffloadError, match=r"offloaded layer 2 .*mid\.00002\.safetensors") as info:
        offload(tiny_llama.model.layers, SepweightSource(d), "cpu")
    assert info.value.layer == 2


@pytest.mark.parametrize("mmap", [True, False])
def test_layer_file_disappears_then_comes_back(
    tiny_llama: Any, tiny_llama_sepweight: Path, tmp_path: Path, want: list[torch.Tensor], mmap: bool
) -> None:
    d = tmp_path / "sw"
    shutil.copytree(tiny_llama_sepweight, d)
    off = offload(tiny_llama.model.layers, SepweightSource(d, mmap=mmap), "cpu", prefetch_depth=1)
    off.evict()
    f = d / "mid.00002.safetensors"
    f.rename(d / "moved")
    with pytest.raises(OffloadError, match=r"offloaded layer 2 .*mid\.00002\.safetensors") as info:
        prefill_and_decode(tiny_llama, IDS, steps=1)
    assert info.value.layer == 2
    assert busy(off) == []
    (d / "moved").rename(f)
    assert_same(prefill_and_decode(tiny_llama, IDS, steps=1), want)
    off.remove()
    assert readers() == []


@pytest.mark.parametrize("mmap", [True, False])
def test_corrupt_file(
    tiny_llama: Any, tiny_llama_sepweight: Path, tmp_path: Path, want: list[torch.Tensor], mmap: bool
) -> None:
    d = tmp_path / "sw"
    shutil.copytree(tiny_llama_sepweight, d)
    f = d / "mid.00001.safetensors"
    good = f.read_bytes()
    off = offload(tiny_llama.model.layers, SepweightSource(d, mmap=mmap), "cpu", prefetch_depth=2)
    off.evict()
    f.write_bytes(good[: len(good) // 2])  # truncated after the header was read
    with pytest.raises(OffloadError, match=r"offloaded layer 1 .*truncated"):
        prefill_and_decode(tiny_llama, IDS, steps=1)
    assert busy(off) == []
    f.write_bytes(good)
    assert_same(prefill_and_decode(tiny_llama, IDS, steps=1), want)
    off.remove()


def test_corrupt_header(tiny_llama: Any, tiny_llama_sepweight: Path, tmp_path: Path) -> None:
    d = tmp_path / "sw"
    shutil.copytree(tiny_llama_sepweight, d)
    (d / "mid.00003.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(
        OffloadError, match=r"offloaded layer 3 .*header length \d+ exceeds the 100000000-byte limit"
    ):
        offload(tiny_llama.model.layers, SepweightSource(d), "cpu")


def test_reader_raises(tiny_llama: Any, reference_llama: Any, want: list[torch.Tensor]) -> None:
    state = [m.state_dict() for m in reference_llama.model.layers]
    broken = {"on": True}

    def load(i: int) -> Any:
        if i == 3 and broken["on"]:
            raise RuntimeError("disk on fire")
        return state[i]

    off = offload(tiny_llama.model.layers, load, "cpu", prefetch_depth=2)
    with pytest.raises(OffloadError, match=r"offloaded layer 3 .*disk on fire") as info:
        prefill_and_decode(tiny_llama, IDS, steps=1)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert busy(off) == [] and all(s.layer is None for s in off.scheduler.slots)
    broken["on"] = False
    assert_same(prefill_and_decode(tiny_llama, IDS, steps=1), want)
    off.remove()
    assert readers() == []


def test_source_missing_a_tensor(tiny_llama: Any, reference_llama: Any) -> None:
    state = [dict(m.state_dict()) for m in reference_llama.model.layers]
    del state[1]["mlp.up_proj.weight"]
    off = offload(tiny_llama.model.layers, lambda i: state[i], "cpu")
    with pytest.raises(OffloadError, match=r"offloaded layer 1 .*no tensor 'mlp.up_proj.weight'"):
        prefill_and_decode(tiny_llama, IDS, steps=0)
    off.remove()


def test_wrong_shape(tiny_llama: Any, reference_llama: Any) -> None:
    state = [dict(m.state_dict()) for m in reference_llama.model.layers]
    state[2]["input_layernorm.weight"] = torch.ones(3)
    off = offload(tiny_llama.model.layers, lambda i: state[i], "cpu")
    with pytest.raises(OffloadError, match=r"offloaded layer 2 .*'input_layernorm.weight' has shape \(3,\)"):
        prefill_and_decode(tiny_llama, IDS, steps=0)
    off.remove()


def test_layer_larger_than_budget(tiny_llama: Any) -> None:
    layers = tiny_llama.model.layers
    src = CpuSource.from_modules(layers)
    with pytest.raises(
        ValueError,
        match=r"offloaded layer 0 \(LlamaDecoderLayer\) needs \d+ bytes, more than max_resident_bytes=1000",
    ):
        offload(layers, src, "cpu", max_resident_bytes=1000)
    with pytest.raises(ValueError, match=r"resident layers .* need"):
        offload(layers, src, "cpu", max_resident_bytes=2 * layer_bytes(tiny_llama), resident=[0, 1, 2])


def test_exception_inside_layer_forward(tiny_llama: Any, want: list[torch.Tensor]) -> None:
    layers = tiny_llama.model.layers
    off = offload(layers, CpuSource.from_modules(layers), "cpu", prefetch_depth=2)
    mlp = layers[2].mlp
    original = mlp.forward
    fail = {"on": True}

    def flaky(x: torch.Tensor) -> torch.Tensor:
        if fail["on"]:
            raise FloatingPointError("bad activations")
        return original(x)

    mlp.forward = flaky
    with pytest.raises(FloatingPointError) as info:
        prefill_and_decode(tiny_llama, IDS, steps=1)
    assert "offloaded layer 2 (LlamaDecoderLayer)" in "".join(getattr(info.value, "__notes__", []))
    assert all(p.device.type == "meta" for p in layers[2].parameters())  # weights released anyway
    assert all(s.users == 0 for s in off.scheduler.slots)
    fail["on"] = False
    assert_same(prefill_and_decode(tiny_llama, IDS, steps=1), want)
    off.remove()
    assert readers() == []


def test_used_after_remove(tiny_llama: Any) -> None:
    layers = tiny_llama.model.layers
    off = offload(layers, CpuSource.from_modules(layers), "cpu")
    off.remove()
    with pytest.raises(Exception, match="meta"):
        prefill_and_decode(tiny_llama, IDS, steps=0)


def test_bad_arguments(tiny_llama: Any) -> None:
    layers = tiny_llama.model.layers
    with pytest.raises(ValueError, match="prefetch_depth"):
        offload(layers, lambda i: {}, "cpu", prefetch_depth=-1)
    with pytest.raises(ValueError, match="no modules"):
        offload([], lambda i: {}, "cpu")
    with pytest.raises(TypeError, match="source must be"):
        offload(layers, 42, "cpu")
    with pytest.raises(ValueError, match="resident: no module at position 9"):
        offload(layers, lambda i: {}, "cpu", resident=[9])
    with pytest.raises(ValueError, match="unsupported device"):
        offload(layers, lambda i: {}, "mps")


def test_offload_twice(tiny_llama: Any, reference_llama: Any, want: list[torch.Tensor]) -> None:
    layers = tiny_llama.model.layers
    state = [m.state_dict() for m in reference_llama.model.layers]
    off = offload(layers, lambda i: state[i], "cpu")
    with pytest.raises(ValueError, match="module 0 is already offloaded"):
        offload(layers, lambda i: state[i], "cpu")
    off.remove()
    off = offload(layers, lambda i: state[i], "cpu")  # after remove(): fine again
    assert_same(prefill_and_decode(tiny_llama, IDS, steps=1), want)
    off.remove()


class Renamed(torch.nn.Module):
    """A module whose state dict shows its weight under a name that loading it back does not map."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4))
        self._register_state_dict_hook(self._rename)

    @staticmethod
    def _rename(module: Any, state: dict[str, Any], prefix: str, meta: Any) -> None:
        state[prefix + "shown"] = state.pop(prefix + "w")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def test_a_weight_left_unloaded_raises_instead_of_computing_on_meta() -> None:
    m = Renamed()
    off = offload([m], [{"shown": torch.full((4,), 2.0)}], "cpu", resident=())
    with pytest.raises(OffloadError, match="'w' was not loaded") as info:
        m(torch.ones(4))
    assert info.value.layer == 0
    off.remove()
    with pytest.raises(OffloadError, match="'w' was not loaded"):
        offload([Renamed()], [{"shown": torch.full((4,), 2.0)}], "cpu", resident=[0])
