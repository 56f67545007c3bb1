"""Streamed Parts equal resident Parts: every family x source x backend x budget x way of loading, in prefill,
cached decode and chained parts.

The families cover grouped, multi-query and full KV heads, fused and separate projections (q/k/v and gate/up
of unequal widths), tied and untied heads, MLA and MoE. A Part computes on the weights the source hands it
(a memory map, a read buffer, a fake device slot), so any mistake in binding them (a projection left on its
`meta` placeholder, a fused weight joined from the wrong views) shows as a difference here.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fake_backend import FakeDeviceBackend
from tiny_configs import TINY_CONFIGS  # tools/, on the path through conftest

from llm_offload import CpuSource, Offload, SepweightSource
from llm_sepweight.format import read_manifest

llm_model_parts = pytest.importorskip("llm_model_parts")
from llm_model_parts import chain, load_part  # noqa: E402

TOL = 1e-5
PROMPT = torch.tensor([[5, 17, 99, 3, 42, 7], [9, 8, 7, 6, 5, 4]])
STEPS = 3
SOURCES = ("cpu", "mmap", "buffers", "direct", "hf")
BACKENDS = ("cpu", "fake-cuda")
BUDGETS = ("stream", "all")
LOADS = ("no_grad", "inference_mode")


@pytest.fixture(scope="module")
def sepweight_dirs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Path]]:
    """family -> (its HF directory, its sepweight directory), converted once per module."""
    import fixtures

    from llm_sepweight import convert

    made: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in made:
            hf = Path(fixtures.tiny_checkpoint(name))
            sw = convert(hf, tmp_path_factory.mktemp("matrix") / name, progress=False)
            made[name] = (hf, Path(sw))
        return made[name]

    return get


def loading(how: str) -> contextlib.AbstractContextManager[Any]:
    return torch.inference_mode() if how == "inference_mode" else torch.no_grad()


def make_source(kind: str, part: Any, hf: Path, sw: Path) -> Any:
    layers = part.layer_indices
    if kind == "cpu":
        return CpuSource.from_modules(part.layers)
    if kind == "hf":
        return SepweightSource(hf, layers=layers)
    return SepweightSource(sw, layers=layers, mmap=kind == "mmap", direct=kind == "direct")


def streamed(
    sw: Path, hf: Path, spec: str, source: str, backend: str, budget: str, how: str
) -> tuple[Any, Offload]:
    """The Part `spec`, loaded under `how`, its layers streamed from `source`."""
    with loading(how):
        part = load_part(sw, spec)
        src = make_source(source, part, hf, sw)
        biggest = max(sum(p.nbytes for p in layer.parameters()) for layer in part.layers)
        # "stream": two slots (one prefetched) and no layer kept; "all": the budget holds every layer.
        limit = 2 * biggest + (64 << 10) if budget == "stream" else 1 << 40
        resident = () if budget == "stream" else "auto"
        off = Offload(
            part.layers,
            src,
            "cpu",
            max_resident_bytes=limit,
            resident=resident,
            prefetch_depth=1,
            backend=FakeDeviceBackend() if backend == "fake-cuda" else None,
        )
    everything = list(range(len(part.layers)))
    assert off.resident == ([] if budget == "stream" else everything), (budget, off.resident)
    return part, off


def decode(forward_func: Any, how: str, tokens: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Prefill of PROMPT, then STEPS cached steps; the tokens fed are `tokens` (the reference's) if given."""
    with loading(how):
        out = [forward_func(PROMPT).clone()]
        for i in range(STEPS):
            nxt = tokens[i] if tokens is not None else out[-1][:, -1:].argmax(-1)
            out.append(forward_func(nxt).clone())
    return out


def fed_tokens(logits: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x[:, -1:].argmax(-1) for x in logits[:-1]]


def max_diff(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True))


def combos() -> Iterator[tuple[str, str, str, str]]:
    yield from itertools.product(SOURCES, BACKENDS, BUDGETS, LOADS)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_streamed_part_equals_resident(family: str, sepweight_dirs: Any) -> None:
    hf, sw = sepweight_dirs(family)
    want = decode(load_part(sw, "f").as_forward_func(max_seq_len=16), "no_grad")
    tokens = fed_tokens(want)
    bad = []
    for source, backend, budget, how in combos():
        part, off = streamed(sw, hf, "f", source, backend, budget, how)
        try:
            got = decode(part.as_forward_func(max_seq_len=16), how, tokens)
            diff = max_diff(got, want)
            calls = {s.calls for s in off.stats.layers}
        except Exception as e:  # reported with the combination below
            diff, calls = float("nan"), {f"{type(e).__name__}: {e}"}
        finally:
            off.remove()
        if not diff <= TOL or calls != {1 + STEPS}:
            bad.append(f"{source}/{backend}/{budget}/{how}: max diff {diff:.3g}, calls per layer {calls}")
    assert not bad, f"{family}: streamed Part differs from the resident one:\n" + "\n".join(bad)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_streamed_chain_equals_resident_chain(family: str, sepweight_dirs: Any) -> None:
    hf, sw = sepweight_dirs(family)
    n = int(read_manifest(sw)["num_layers"])
    specs = (f"b 0-{n // 2}", f"{n // 2}-{n} e")
    want = decode(chain([load_part(sw, s) for s in specs]).as_forward_func(max_seq_len=16), "no_grad")
    tokens = fed_tokens(want)
    bad = []
    # The two parts stream from different sources; the chain hands hidden states from one to the other.
    for (src_a, src_b), backend, how in itertools.product(
        (("mmap", "hf"), ("direct", "cpu")), BACKENDS, LOADS
    ):
        first, off_a = streamed(sw, hf, specs[0], src_a, backend, "stream", how)
        second, off_b = streamed(sw, hf, specs[1], src_b, backend, "stream", how)
        try:
            got = decode(chain([first, second]).as_forward_func(max_seq_len=16), how, tokens)
            diff = max_diff(got, want)
        except Exception as e:
            bad.append(f"{src_a}+{src_b}/{backend}/{how}: {type(e).__name__}: {e}")
            continue
        finally:
            off_a.remove()
            off_b.remove()
        if not diff <= TOL:
            bad.append(f"{src_a}+{src_b}/{backend}/{how}: max diff {diff:.3g}")
    assert not bad, f"{family}: streamed chain differs from the resident one:\n" + "\n".join(bad)


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_real_checkpoint_streamed_equals_resident(name: str, tmp_path: Path) -> None:
    import fixtures

    from llm_sepweight import convert

    hf = Path(fixtures.real_checkpoint(name))
    sw = Path(convert(hf, tmp_path / name, progress=False))
    want = decode(load_part(sw, "f").as_forward_func(max_seq_len=16), "no_grad")
    tokens = fed_tokens(want)
    bad = []
    for source, how in (("mmap", "inference_mode"), ("buffers", "no_grad"), ("hf", "inference_mode")):
        part, off = streamed(sw, hf, "f", source, "cpu", "stream", how)
        try:
            got = decode(part.as_forward_func(max_seq_len=16), how, tokens)
        finally:
            off.remove()
        if not max_diff(got, want) <= TOL:
            bad.append(f"{source}/{how}: max diff {max_diff(got, want):.3g}")
    assert not bad, f"{name}: streamed Part differs from the resident one:\n" + "\n".join(bad)
