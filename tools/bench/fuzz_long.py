"""The long fuzz run of llm_sepweight's readers: cases, time and outcomes per target, saved as JSON.

    python tools/bench/fuzz_long.py [--scale 25] [--seed 1]

Runs llm_sepweight/tests/fuzz_engine.py (mutation fuzzing in a memory-capped worker, a deadline per case)
for each target with `scale` times the CI case counts, prints a table and writes
tools/bench/results/fuzz_long.json. The Hypothesis half runs with `LLM_MICROLIBS_FUZZ=long pytest
llm_sepweight/tests/test_fuzz_readers.py`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "llm_sepweight" / "tests"))
from test_fuzz_readers import CASES, run_engine  # noqa: E402

logger = logging.getLogger("fuzz_long")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=25)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = []
    start = time.perf_counter()
    for target in sorted(CASES):
        result = run_engine(target, CASES[target] * args.scale, seed=args.seed, timeout=3600)
        results.append(result)
        logger.info(
            "%-12s %7d cases %8.1f s  unexpected %d  %s",
            target,
            result["cases"],
            result["seconds"],
            len(result["unexpected"]),
            json.dumps(result["outcomes"], sort_keys=True),
        )
    total = time.perf_counter() - start
    logger.info("total %d cases in %.1f s", sum(r["cases"] for r in results), total)
    out = ROOT / "tools" / "bench" / "results" / "fuzz_long.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"scale": args.scale, "seed": args.seed, "seconds": round(total, 1), "targets": results}, indent=1
        )
        + "\n"
    )
    logger.info("saved %s", out)


if __name__ == "__main__":
    main()
