"""The pipeline's transport, driver and fault handling, on toy stages (gloo on localhost, real processes)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pipeline_support as toy

from llm_model_parts.pipeline import PipelineDriver, StageInfo, backend_for, check_chain
from llm_model_parts.pipeline.stage import check_input
from llm_model_parts.pipeline.transport import Command, Header, PipelineError, link_device

WALL = 90.0  # hard wall clock per launch: a hanging pipeline fails the test instead of the CI job


def _reference() -> dict[str, torch.Tensor]:
    """The script on the whole toy model in this process, without the pipeline."""
    out = toy.script(toy.ToyForward("f"))
    out["seq_len"] = torch.tensor(int(out["seq_len"]))
    return out


def test_header_round_trip() -> None:
    h = Header(Command.FORWARD, item=3, arg=2, payloads=((torch.bfloat16, (2, 5, 16)), (torch.uint8, (2, 9))))
    assert Header.decode(h.encode(), peer=1) == h
    bad = h.encode()
    bad[0] = 7
    with pytest.raises(PipelineError, match="not a pipeline header"):
        Header.decode(bad, peer=4)


def _info(spec: str, begin: bool, layers: tuple[int, int], end: bool, **kw: object) -> StageInfo:
    base = dict(num_layers=6, hidden_size=16, vocab_size=50, dtype="float32", device="cpu", max_seq_len=64)
    base.update(kw)
    return StageInfo(spec, begin, layers, end, **base)  # type: ignore[arg-type]


def test_payloads_use_nccl_only_between_two_cuda_ranks() -> None:
    assert link_device("cuda:1", "cuda:0") == torch.device("cuda:1")
    assert link_device("cuda:0", "cpu") == torch.device("cpu")
    assert link_device("cpu", "cuda:0") == torch.device("cpu")
    assert backend_for("cuda:0") == "cpu:gloo,cuda:nccl"
    assert backend_for("cpu") == "gloo"


def test_chain_errors_name_the_rank_and_layer() -> None:
    good = [
        _info("b 0-2", True, (0, 2), False),
        _info("2-4", False, (2, 4), False),
        _info("4-6 e", False, (4, 6), True),
    ]
    check_chain(good, complete=True)
    with pytest.raises(PipelineError, match=r"rank 1 holds '3-4', starting at layer 3"):
        check_chain([good[0], _info("3-4", False, (3, 4), False)], complete=False)
    with pytest.raises(PipelineError, match="dtype=float16 but rank 0"):
        check_chain([good[0], _info("2-4", False, (2, 4), False, dtype="float16")], complete=False)
    with pytest.raises(PipelineError, match="layers 4-6 are missing"):
        check_chain(good[:2], complete=True)
    with pytest.raises(PipelineError, match="must hold end"):
        check_chain([*good[:2], _info("4-6", False, (4, 6), False)], complete=True)
    with pytest.raises(PipelineError, match="not begin"):
        check_chain(good[1:], complete=True)


@pytest.mark.parametrize("micro_batches,chunk", [(1, None), (2, 3), (3, 1)])
def test_local_driver_equals_direct_calls(micro_batches: int, chunk: int | None) -> None:
    ref = _reference()
    driver = PipelineDriver(toy.toy_stage("f"), world=1, micro_batches=micro_batches, prefill_chunk=chunk)  # type: ignore[arg-type]
    out = toy.script(driver)
    for k, v in ref.items():
        torch.testing.assert_close(out[k], v, rtol=0, atol=1e-5, msg=k)


def test_local_driver_output_modes_and_capacity() -> None:
    ids = torch.randint(0, toy.VOCAB, (2, 5))
    full = PipelineDriver(toy.toy_stage("f"), world=1)(ids)  # type: ignore[arg-type]
    last = PipelineDriver(toy.toy_stage("f"), world=1, output="last", prefill_chunk=2)(ids)  # type: ignore[arg-type]
    arg = PipelineDriver(toy.toy_stage("f"), world=1, output="argmax", micro_batches=2)(ids)  # type: ignore[arg-type]
    torch.testing.assert_close(last, full[:, -1:])
    assert torch.equal(arg, full.argmax(-1))
    d = PipelineDriver(toy.toy_stage("f", max_seq_len=8), world=1)  # type: ignore[arg-type]
    d(ids)
    with pytest.raises(ValueError, match="capacity of 8"):
        d(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="this sequence has 2"):
        d(torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="rewind"):
        d.rewind(6)


def test_processes_equal_one_process(tmp_path: Path) -> None:
    argv = toy.toy_argv("script", tmp_path, "b 0-2,2-4,4-6 e", "--micro-batches", "2", "--prefill-chunk", "3")
    results = toy.launch([argv] * 3, wall=WALL)
    for r in results:
        assert r.returncode == 0, f"rank {r.rank} failed:\n{r.output[-3000:]}"
    out = load_file(str(tmp_path / "rank0.safetensors"))
    ref = _reference()
    assert set(out) == set(ref)
    for k, v in ref.items():
        torch.testing.assert_close(out[k], v, rtol=0, atol=1e-5, msg=k)


def _assert_all_fail_fast(results: list[toy.RankResult], *, victim: int, limit: float, expect: str) -> None:
    fault = results[victim].fault_at
    for r in results:
        if r.rank == victim:
            continue
        assert r.returncode is not None, f"rank {r.rank} still ran at the wall clock:\n{r.output[-3000:]}"
        assert r.returncode != 0, f"rank {r.rank} exited 0 although rank {victim} failed"
        took = r.ended_at - fault
        assert took < limit, f"rank {r.rank} exited {took:.1f} s after the fault (limit {limit} s)"
        assert "PipelineError" in r.output or "PipelineTimeout" in r.output or "RemoteError" in r.output, (
            r.output[-3000:]
        )
    others = "".join(r.output for r in results if r.rank != victim)
    assert expect in others, others[-5000:]


@pytest.mark.parametrize(
    "fault,victim,expect",
    [
        ("kill:1:4", 1, "rank 1 closed the connection"),  # a middle rank dies mid-generation
        ("hang:2:6", 2, "nothing from rank"),  # the last rank hangs
        ("kill:0:5", 0, "rank 0 closed the connection"),  # the driver dies: the workers must not wait forever
    ],
)
def test_dead_or_hung_rank_fails_the_others(tmp_path: Path, fault: str, victim: int, expect: str) -> None:
    timeout = 4.0
    argv = toy.toy_argv("loop", tmp_path, "b 0-2,2-4,4-6 e", "--timeout", str(timeout))
    results = toy.launch([argv] * 3, wall=WALL, env={"TOY_FAULT": fault}, hung=victim)
    # a hang costs one timeout per rank that waits on another waiting rank; a death is seen at once
    _assert_all_fail_fast(results, victim=victim, limit=2 * timeout + 5, expect=expect)


def test_heartbeat_notices_a_hang_while_idle(tmp_path: Path) -> None:
    timeout = 3.0
    argv = toy.toy_argv("idle", tmp_path, "b 0-2,2-4,4-6 e", "--timeout", str(timeout))
    # rank 1 answers rank 0's one call, then stops: only heartbeats can notice
    results = toy.launch([argv] * 3, wall=WALL, env={"TOY_FAULT": "stop:1:1"}, hung=1)
    fault = results[1].fault_at
    for r in (results[0], results[2]):
        assert r.returncode not in (0, None), f"rank {r.rank}: {r.returncode}\n{r.output[-3000:]}"
        # the heartbeat goes out every timeout/4 when idle and waits one timeout for its answer
        assert r.ended_at - fault < 2 * timeout + 5, f"rank {r.rank} took {r.ended_at - fault:.1f} s"
    assert "nothing from rank" in results[0].output or "nothing from rank" in results[2].output


def test_bad_plan_fails_at_start_up(tmp_path: Path) -> None:
    argv = toy.toy_argv("script", tmp_path, "b 0-2,3-4,4-6 e")
    results = toy.launch([argv] * 3, wall=WALL)
    assert all(r.returncode not in (0, None) for r in results), [r.returncode for r in results]
    assert "rank 1 holds '3-4', starting at layer 3" in results[0].output


def test_each_message_is_checked_against_the_stage() -> None:
    mid = toy.toy_stage("2-4").info  # type: ignore[attr-defined]
    check_input(mid, torch.zeros(1, 3, toy.HIDDEN), sender=0)
    with pytest.raises(
        PipelineError, match=r"expects hidden states float32 \[B, T, 16\], rank 0 sent float64 \[1, 3, 16\]"
    ):
        check_input(mid, torch.zeros(1, 3, toy.HIDDEN, dtype=torch.float64), sender=0)
    with pytest.raises(PipelineError, match=r"sent float32 \[1, 3, 8\]"):
        check_input(mid, torch.zeros(1, 3, 8), sender=0)
    with pytest.raises(PipelineError, match="expects token ids int64"):
        check_input(toy.toy_stage("b 0-2").info, torch.zeros(1, 3, toy.HIDDEN), sender=0)  # type: ignore[attr-defined]
