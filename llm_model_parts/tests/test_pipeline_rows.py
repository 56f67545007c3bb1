"""The pipeline driver's rows protocol (continuous batching, docs/forward_func.md) against the one-process
`IncrementalForward` doing the same operations: rows joining while others decode, a left-padded group,
ragged decode, rewind of one row, a row leaving from the middle, micro-batches and chunks, logits_to_keep."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from parts_testlib import fixtures
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pipeline_support as support

from llm_model_parts import load_part
from llm_model_parts.cache import CacheOverflowError
from llm_model_parts.forward_func import IncrementalForward
from llm_model_parts.pipeline import PipelineDriver, stage_from_part
from llm_model_parts.pipeline import stage as stage_module

WALL = 90.0
MAX_ROWS, MAX_SEQ_LEN = 5, 64
PLAN = "b 0-1,1-3,3-4 e"


@pytest.fixture(scope="module")
def llama() -> Path:
    return Path(fixtures.tiny_checkpoint("llama"))


@pytest.fixture(scope="module")
def reference(llama: Path) -> dict[str, torch.Tensor]:
    f = IncrementalForward([load_part(llama, "f")], max_seq_len=MAX_SEQ_LEN, max_rows=MAX_ROWS)
    return support.rows_script(support.KeepLogits(f), MAX_ROWS)


def _assert_equal(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert set(out) == set(ref)
    for k, v in ref.items():
        assert out[k].shape == v.shape, (k, out[k].shape, v.shape)
        torch.testing.assert_close(out[k], v, rtol=0, atol=1e-5, msg=k)
    assert int(out["full"]) == 1 and int(out["moved"]) == 3 and int(out["last_leaves"]) == -1


def _driver(llama: Path, **kw: object) -> PipelineDriver:
    stage = stage_from_part(load_part(llama, "f"), max_seq_len=MAX_SEQ_LEN)
    return PipelineDriver(stage, world=1, output="last", max_rows=MAX_ROWS, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("micro_batches,chunk", [(1, None), (2, 3)])
def test_local_driver_rows_equal_incremental_forward(
    llama: Path,
    reference: dict[str, torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
    micro_batches: int,
    chunk: int | None,
) -> None:
    monkeypatch.setattr(stage_module, "_MIN_ROWS_CAPACITY", 4)  # the rows cache grows as rows get longer
    out = support.rows_script(_driver(llama, micro_batches=micro_batches, prefill_chunk=chunk), MAX_ROWS)
    _assert_equal(out, reference)


@pytest.mark.parametrize("micro_batches,chunk", [(1, None), (2, 3)])
def test_processes_rows_equal_one_process(
    llama: Path, reference: dict[str, torch.Tensor], tmp_path: Path, micro_batches: int, chunk: int | None
) -> None:
    (tmp_path / "job.json").write_text(
        json.dumps({"model": str(llama), "max_seq_len": MAX_SEQ_LEN, "max_rows": MAX_ROWS})
    )
    extra = ["--micro-batches", str(micro_batches)] + (["--prefill-chunk", str(chunk)] if chunk else [])
    results = support.launch([support.toy_argv("rows", tmp_path, PLAN, *extra)] * 3, wall=WALL)
    for r in results:
        assert r.returncode == 0, f"rank {r.rank} failed:\n{r.output[-3000:]}"
    _assert_equal(load_file(str(tmp_path / "rank0.safetensors")), reference)


def test_a_rank_that_cannot_add_a_row_fails_clearly(llama: Path, tmp_path: Path) -> None:
    (tmp_path / "job.json").write_text(
        json.dumps({"model": str(llama), "max_seq_len": MAX_SEQ_LEN, "max_rows": MAX_ROWS})
    )
    argv = support.toy_argv("rows", tmp_path, PLAN, "--timeout", "20")
    results = support.launch([argv] * 3, wall=WALL, env={"ROWS_CAP": "1:1"})
    assert all(r.returncode not in (0, None) for r in results), [r.returncode for r in results]
    assert all(r.seconds < 60 for r in results), [r.seconds for r in results]
    assert "RemoteError" in results[0].output and "rank 1" in results[0].output, results[0].output[-3000:]
    assert "all 1 rows are in use" in results[0].output, results[0].output[-3000:]


def test_logits_to_keep_shapes_and_default(llama: Path) -> None:
    d = _driver(llama)
    d.add_row()
    d.add_row()
    ids = torch.randint(3, 200, (2, 5))
    assert d(ids, rows=slice(0, 2), logits_to_keep=0).shape == (2, 5, 256)
    assert d(ids[:, :1], rows=slice(0, 2), logits_to_keep=1).shape == (2, 1, 256)
    assert d(ids[:1, :1], rows=slice(1, 2)).shape == (1, 1, 256)  # output="last"
    assert d(ids[:, :3], rows=slice(0, 2), logits_to_keep=2).shape == (2, 2, 256)
    d.reset()
    full = d(ids, logits_to_keep=0)  # a fixed batch overrides output="last" too
    d.reset()
    torch.testing.assert_close(d(ids)[:, -1], full[:, -1], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="logits_to_keep"):
        d(ids[:, :1], logits_to_keep=-1)


def test_rows_errors_leave_the_driver_working(llama: Path) -> None:
    d = _driver(llama)
    with pytest.raises(ValueError, match="add_row"):
        d(torch.tensor([[1]]), rows=slice(0, 1))
    for _ in range(MAX_ROWS):
        d.add_row()
    with pytest.raises(CacheOverflowError, match=f"all {MAX_ROWS} rows are in use"):
        d.add_row()
    with pytest.raises(ValueError, match="rows"):
        d(torch.tensor([[1], [2]]), rows=slice(0, 1))
    with pytest.raises(ValueError, match=r"rows=slice\(4, 9"):
        d(torch.tensor([[1]]), rows=slice(4, 9))
    with pytest.raises(ValueError, match="remove_row"):
        d.remove_row(MAX_ROWS)
    with pytest.raises(ValueError, match=r"rewind\(1\): row 0 holds 0 tokens"):
        d.rewind(1, row=0)
    with pytest.raises(CacheOverflowError, match="max_seq_len=64"):
        d(torch.ones(1, MAX_SEQ_LEN + 1, dtype=torch.long), rows=slice(0, 1))
    d(torch.ones(1, 3, dtype=torch.long), rows=slice(0, 1))
    with pytest.raises(ValueError, match="attention_mask"):  # rows of different lengths
        d(torch.ones(2, 1, dtype=torch.long), attention_mask=torch.ones(2, 4), rows=slice(0, 2))
    with pytest.raises(ValueError, match="fixed batch"):
        d.reset()
        d(torch.ones(2, 1, dtype=torch.long))
        d.add_row()
    assert d.failure is None
    d.reset()
    assert d.add_row() == 0 and d.rows == 1


def test_server_engine_drives_the_driver_directly(llama: Path) -> None:
    from llm_sampler.server.engine import as_rows

    d = _driver(llama)
    assert as_rows(d) is d
    with pytest.raises(ValueError, match="max_rows"):
        PipelineDriver(None, world=1, max_rows=0)


def test_stage_rows_cache_is_freed_when_the_last_row_leaves() -> None:
    from llm_model_parts.pipeline.stage import PartRows

    rows = PartRows(load_part(fixtures.tiny_checkpoint("llama"), "f"), max_seq_len=1024, max_rows=2)
    for _ in range(2):
        rows.add_row()
    rows(torch.randint(3, 200, (1, 300)), None, slice(1, 2), logits_to_keep=1)
    assert rows.cache.max_seq_len == 512
    rows.remove_row(1)
    assert rows.cache.max_seq_len == 512  # a row is still in use
    rows.remove_row(0)
    assert rows.cache.max_seq_len == 256 and rows.cache.rows == 0
    assert rows.add_row() == 0
