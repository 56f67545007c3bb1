"""Kill-during-conversion trials: never a directory that verifies and is wrong; a rerun always finishes the job."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sw_helpers import tiny

TRIALS = 24  # a tiny model, about 10 s on two cores; KILL_TRIALS=... in the environment runs more


def test_kills_at_random_points(tmp_path: Path) -> None:
    import os

    trials = int(os.environ.get("KILL_TRIALS", TRIALS))
    script = Path(__file__).with_name("kill_trials.py")
    r = subprocess.run(
        [sys.executable, str(script), str(tiny("llama")), str(tmp_path), "13", str(trials)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    print(results)  # the figures, in the test log
    assert results["wrong"] == []
    assert results["kills"] >= trials - 2
    assert results["reruns_finished"] + results["reruns_refused_source_changed"] == trials
    assert results["refused_after_kill"] > 0 and results["verified_after_kill"] > 0
    assert results["source_changed_trials"] > 0
