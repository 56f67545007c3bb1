"""One call for everything: `start_pipeline` joins the process group torchrun describes, plans the split
(or takes one spec per rank), loads this rank's part and either returns rank 0's `PipelineDriver` or serves
the stage (`run_worker`) until rank 0 closes the driver."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from llm_model_parts.pipeline.driver import PipelineDriver
from llm_model_parts.pipeline.handshake import handshake
from llm_model_parts.pipeline.stage import load_stage
from llm_model_parts.pipeline.worker import run_worker

logger = logging.getLogger(__name__)


def backend_for(device: str | torch.device) -> str:
    """gloo for CPU tensors; on CUDA, NCCL for CUDA tensors and gloo for the CPU headers."""
    return "cpu:gloo,cuda:nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed(*, device: str | torch.device, timeout: float) -> bool:
    """Join the process group torchrun describes (env://); returns False when it was joined already."""
    if dist.is_initialized():
        return False
    device = torch.device(device)
    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group(backend=backend_for(device), timeout=timedelta(seconds=timeout), **kwargs)
    return True


def parse_plan(plan: str | Sequence[str], world: int) -> list[str]:
    """`"b 0-10,10-20,20-30 e"` or a list of specs -> one spec per rank."""
    specs = [s.strip() for s in plan.split(",")] if isinstance(plan, str) else [str(s).strip() for s in plan]
    if len(specs) != world:
        raise ValueError(
            f"the plan has {len(specs)} specs ({specs}) but there are {world} ranks: give one spec per rank"
        )
    return specs


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def start_pipeline(
    model: str | Any,
    plan: str | Sequence[str] = "auto",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    max_seq_len: int = 2048,
    batch_size: int = 1,
    micro_batches: int = 1,
    prefill_chunk: int | None = None,
    output: str = "logits",
    max_rows: int = 8,
    timeout: float = 60.0,
    startup_timeout: float = 600.0,
    memory: int | str | None = None,
) -> PipelineDriver | None:
    """Join the process group, load this rank's part of `model` (a sepweight or HF directory), and run.

    Rank 0 gets a PipelineDriver (an incremental forward_func); every other rank serves its stage until
    rank 0 closes the driver, then gets None. `plan` is "auto" (`plan_split` over each rank's `memory`,
    default: what this device has free) or one spec per rank. Batches of up to `batch_size` rows
    (`micro_batches` cache sets of batch_size/micro_batches rows on every rank), or, through the rows
    protocol (continuous batching), up to `max_rows` rows in one cache per rank.
    """
    from llm_model_parts.pipeline.plan import detect_memory, parse_bytes, plan_split

    device = torch.device(device) if device is not None else default_device()
    own_group = init_distributed(device=device, timeout=startup_timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        if plan == "auto":
            budget = parse_bytes(memory) if memory is not None else detect_memory(device)
            budgets = torch.zeros(world, dtype=torch.int64)
            budgets[rank] = budget
            dist.all_reduce(budgets)  # gloo on CPU tensors
            specs = plan_split(
                model,
                budgets.tolist(),
                dtype=dtype or torch.float32,
                max_seq_len=max_seq_len,
                batch_size=batch_size,
            )
            if rank == 0:
                logger.info("plan: %s (budgets %s)", specs, budgets.tolist())
        else:
            specs = parse_plan(plan, world)
        stage = load_stage(model, specs[rank], device=device, dtype=dtype, max_seq_len=max_seq_len)
        # the others may still be loading: the handshake waits up to startup_timeout
        if rank == 0:
            infos = handshake(stage.info, 0, world, timeout=startup_timeout) if world > 1 else None
            return PipelineDriver(
                stage,
                infos=infos,
                world=world,
                micro_batches=micro_batches,
                prefill_chunk=prefill_chunk,
                output=output,
                max_rows=max_rows,
                timeout=timeout,
                owns_group=own_group,
            )
        run_worker(stage, rank=rank, world=world, timeout=timeout, startup_timeout=startup_timeout)
    except BaseException:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()
        raise
    if own_group:
        dist.destroy_process_group()
    return None
