"""Run a model's parts on several processes or hosts with torch.distributed: a pipeline behind one forward_func.

Rank r holds one part (its spec: `"b 0-10"`, `"10-20"`, `"20-30 e"` ...) with a KV cache per micro-batch.
Rank 0 drives: `PipelineDriver` is an incremental forward_func (docs/forward_func.md), so llm_sampler
generates and scores through it as through a local model; every other rank runs `run_worker`. Every wait on
every rank has a timeout, so a rank that dies or hangs makes the others fail with a clear error.

One idea per module, each using the others' public names only:

- `transport`: the wire format (`Header`, `Command`), `Link` (point-to-point with timeouts), the errors.
- `stage`: what a rank holds (`StageInfo`, `Stage`), its per-micro-batch caches, what the last rank returns.
- `handshake`: start-up, where every rank learns and checks what the others hold.
- `driver`: rank 0's `PipelineDriver`.
- `rows`: rank 0's record of the rows in use (the rows protocol of continuous batching).
- `worker`: every other rank's loop, `run_worker`.
- `launch`: `start_pipeline` (join the process group, plan, load, drive or serve).
- `plan`: `plan_split`, layers across nodes in proportion to their memory.
- `serve`: the torchrun launcher, `python -m llm_model_parts.serve` (imported by nothing).
"""

from llm_model_parts.pipeline.driver import PipelineDriver
from llm_model_parts.pipeline.handshake import check_chain, handshake
from llm_model_parts.pipeline.launch import (
    backend_for,
    default_device,
    init_distributed,
    parse_plan,
    start_pipeline,
)
from llm_model_parts.pipeline.plan import plan_split
from llm_model_parts.pipeline.stage import (
    OUTPUTS,
    Output,
    PartForward,
    Stage,
    StageCaches,
    StageForward,
    StageInfo,
    load_stage,
    stage_from_part,
)
from llm_model_parts.pipeline.transport import PipelineError, PipelineTimeout, RemoteError
from llm_model_parts.pipeline.worker import run_worker

__all__ = [
    "OUTPUTS",
    "Output",
    "PartForward",
    "PipelineDriver",
    "PipelineError",
    "PipelineTimeout",
    "RemoteError",
    "Stage",
    "StageCaches",
    "StageForward",
    "StageInfo",
    "backend_for",
    "check_chain",
    "default_device",
    "handshake",
    "init_distributed",
    "load_stage",
    "parse_plan",
    "plan_split",
    "run_worker",
    "stage_from_part",
    "start_pipeline",
]
