"""Write docs/benchmarks.md from the JSON files the benchmark scripts saved in tools/bench/results/.

Each script stands alone (`python tools/bench/bench_<topic>.py`); `tools/bench/run_all.sh` runs them all
and then this. The page lists the machine, then one section per benchmark: its headline ratios, its
tables (every list of rows in its JSON) and its plots.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "tools" / "bench" / "results"
OUT = ROOT / "docs" / "benchmarks.md"

# topic -> (title, what is compared, the target the issue set)
TOPICS: dict[str, tuple[str, str]] = {
    "sepweight_load": (
        "llm_sepweight: loading a part",
        "Loading `b 0-15` of SmolLM2-135M fp32 (hot page cache) against raw `safetensors.safe_open().get_tensor` "
        "over the same bytes, the original llm_sepweight 0.10 (`.pth`, separate process) and llm-layer-collector. "
        "Targets: >= 0.8x safetensors' throughput, >= 3x llm_sepweight 0.10.",
    ),
    "parts": (
        "llm_model_parts: decode and prefill against transformers",
        "SmolLM2-135M fp32 CPU: greedy decode of 64 tokens with our cache against transformers' `generate` "
        "(same tokens), prefill of 32 and 256 tokens against transformers' forward. Targets: decode >= 1.3x "
        "tokens/s, prefill no slower. A deepcopy, a safetensors save/reload and the compiled decode step "
        "(`CompiledDecoder`) are timed beside it.",
    ),
    "parts_gemma3": (
        "llm_model_parts: Gemma-3-270M against transformers",
        "The same measurement on Gemma-3-270M fp32 CPU (`bench_parts.py --model gemma3`); no target was set. "
        "Its 262k-entry LM head is two thirds of the bytes read per token.",
    ),
    "parts_more": (
        "llm_model_parts: more families against transformers",
        "Cached greedy decode tokens/s of our parts against transformers' `generate`, tiny configs scaled up, CPU fp32.",
    ),
    "sampler": (
        "llm_sampler: one sampling step",
        "Repetition penalty 1.1, temperature 0.8, top-k 50, top-p 0.9; batch 32; vocabulary 151,936; against "
        "transformers' `LogitsProcessorList` + `multinomial`; llama.cpp's chain (DRY, top-nσ, min-p, XTC, "
        "temperature) against the same chain as vectorised `LogitsProcessor`s; same distribution. Targets >= 5x. "
        "Then a constraint's cost per SmolLM2-135M CPU decode step (target <= +20%).",
    ),
    "scoring": (
        "llm_sampler: closed-form scoring",
        "SmolLM2-135M-Instruct fp32 CPU, multiple-choice questions: the naive loop, lm-evaluation-harness's HFLM "
        "(batch 32), our `score_many` with a stateless HF forward_func and with a Part's incremental forward_func. "
        "Targets: stateless >= lm-eval's speed, Part >= 2x lm-eval.",
    ),
    "offload": (
        "llm_offload: streamed layers",
        "SmolLM2-135M fp32 from a sepweight directory, at most 4 layers resident, forward of 256 tokens. Targets: "
        "hot page cache <= 1.1x all-resident; cold <= 1.05x a naive load-then-compute loop.",
    ),
    "pipeline": (
        "llm_model_parts: pipeline across processes",
        "Time to first token and tokens/s for 1, 2 and 3 local processes (gloo), per-hop overhead. Several "
        "processes on one 2-core machine is not a multi-host measurement.",
    ),
    "scaling": (
        "How time grows: prompt length, batch size, resident budget",
        "SmolLM2-135M fp32 CPU, ours against transformers (and streamed against resident).",
    ),
}


def machine() -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = "not installed"
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return [
        f"- machine: {cpu}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}",
        f"- Python {sys.version.split()[0]}, torch {torch_version}",
    ]


def fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def table(rows: list[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [k for k, v in row.items() if k not in columns and not isinstance(v, (dict, list))]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return lines


def flatten(
    data: Any, prefix: str = ""
) -> tuple[list[tuple[str, Any]], list[tuple[str, list[dict[str, Any]]]]]:
    """Scalars as (dotted key, value) and lists of rows as (dotted key, rows)."""
    scalars: list[tuple[str, Any]] = []
    tables: list[tuple[str, list[dict[str, Any]]]] = []
    if isinstance(data, dict):
        if (
            data
            and all(isinstance(v, dict) for v in data.values())
            and all(not any(isinstance(x, (dict, list)) for x in v.values()) for v in data.values())
        ):
            tables.append((prefix, [{"": k, **v} for k, v in data.items()]))
            return scalars, tables
        for key, value in data.items():
            s, t = flatten(value, f"{prefix}.{key}" if prefix else str(key))
            scalars += s
            tables += t
    elif isinstance(data, list):
        if data and all(isinstance(x, dict) for x in data):
            tables.append((prefix, data))
    else:
        scalars.append((prefix, data))
    return scalars, tables


def section(topic: str, data: dict[str, Any]) -> list[str]:
    title, what = TOPICS.get(topic, (topic, ""))
    lines = [f"## {title}", "", what, "", f"Reproduce: `python tools/bench/bench_{topic}.py`", ""]
    scalars, tables = flatten(data)
    if scalars:
        lines += ["| measure | value |", "|---|---|"]
        lines += [f"| {k} | {fmt(v)} |" for k, v in scalars if k != "plots"]
        lines.append("")
    for name, rows in tables:
        if name.endswith("layers"):  # per-layer offload stats: too long for the page
            continue
        lines += [f"**{name}**", "", *table(rows), ""]
    for plot in data.get("plots", []):
        lines += [f"![{Path(plot).stem}]({Path(plot).relative_to('docs')})", ""]
    return lines


def main() -> None:
    lines = [
        "# Benchmarks",
        "",
        "Made by `tools/bench/run_all.sh` (each script also runs alone). Every figure is a comparison run side",
        "by side in one process (or one run) on the machine below; ratios matter more than absolute times,",
        "since the machines are shared and noisy.",
        "",
        *machine(),
        "",
    ]
    for topic in TOPICS:
        path = RESULTS / f"{topic}.json"
        if path.exists():
            lines += section(topic, json.loads(path.read_text()))
        else:
            lines += [f"## {TOPICS[topic][0]}", "", f"Not run (no {path.relative_to(ROOT)}).", ""]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
