"""Kill a conversion at chosen points (SIGKILL, in a forked child) and check what is left, then rerun it.

Run as a script by test_kill_trials.py: `python kill_trials.py SRC WORK SEED TRIALS`; prints one JSON line.
The kill points are the file-system events of a conversion (mkdir, fsync, rename/replace, unlink), each
taken just before or just after the event: every event of the first directory creation, the first journal
write, the rename of the new directory, the manifest and the journal's removal, plus a random sample.
After each kill: `verify` either fails or the directory equals the reference conversion byte for byte;
then a rerun must finish with exactly the reference. Some trials change the source between the kill and
the rerun: the rerun must then give the new source's conversion, never a mix.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from llm_sepweight import convert, verify
from llm_sepweight.verify import VerifyError

_HOOKED = ("mkdir", "fsync", "rename", "replace", "unlink", "rmdir")
logging.disable(logging.WARNING)


def _install_kill(at: int, after: bool, log: list[str]) -> None:
    """Patch os so that the `at`-th event kills this process (before or after the event itself)."""
    for name in _HOOKED:
        real: Callable[..., Any] = getattr(os, name)

        def hooked(*args: Any, _real: Callable[..., Any] = real, _name: str = name, **kwargs: Any) -> Any:
            log.append(f"{_name} {Path(str(args[0])).name if args and not isinstance(args[0], int) else ''}")
            if len(log) == at and not after:
                os.kill(os.getpid(), signal.SIGKILL)
            try:
                return _real(*args, **kwargs)
            finally:  # after the event, also when it raised (unlink of a temp file already renamed)
                if len(log) == at and after:
                    os.kill(os.getpid(), signal.SIGKILL)

        setattr(os, name, hooked)


def _run_child(src: Path, out: Path, at: int, after: bool, events_file: Path | None = None) -> int:
    pid = os.fork()
    if pid == 0:
        log: list[str] = []
        code = 0
        try:
            _install_kill(at, after, log)
            convert(src, out, progress=False)
        except BaseException:
            code = 3
        if events_file is not None:
            events_file.write_text(json.dumps(log))
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _contents(path: Path) -> dict[str, Any]:
    """Every file's bytes, with the manifest's mtime-dependent source fingerprint left out."""
    out: dict[str, Any] = {}
    for p in sorted(path.iterdir()):
        if p.name == "manifest.json":
            manifest = json.loads(p.read_text())
            manifest["source"].pop("fingerprint", None)
            out[p.name] = manifest
        else:
            out[p.name] = p.read_bytes()
    return out


def _changed_copy(src: Path, dest: Path) -> None:
    """`dest`: the model at `src` with one tensor's values changed (same names, dtypes and shapes)."""
    shutil.copytree(src, dest)
    shard = sorted(dest.glob("*.safetensors"))[-1]
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    save_file(tensors, shard, metadata={"format": "pt"})


def _put(model: Path, at: Path) -> None:
    for p in model.iterdir():
        shutil.copy2(p, at / p.name) if p.is_file() else None


def _kill_points(events: list[str], rng: random.Random, trials: int) -> list[tuple[int, bool]]:
    journal_events = [i for i, e in enumerate(events, 1) if "sepweight-partial" in e]
    manifest = [i for i, e in enumerate(events, 1) if e.startswith("replace") and "manifest" in e]
    rename_dir = [i for i, e in enumerate(events, 1) if e.startswith("rename")]
    new_dir = next(i for i, e in enumerate(events, 1) if e.startswith("mkdir") and "sepweight-new" in e)
    must = {(new_dir, False), (new_dir, True)}  # the new directory made, its journal not yet written
    must |= {(journal_events[0], False), (journal_events[0], True)}  # the first journal write
    must |= {(i, a) for i in rename_dir[:1] for a in (False, True)}
    must |= {(i, True) for i in manifest} | {(i + 1, a) for i in manifest for a in (False, True)}
    last_unlink = [i for i, e in enumerate(events, 1) if e == "unlink .sepweight-partial.json"]
    must |= {(i, a) for i in last_unlink for a in (False, True)} | {(len(events), True)}
    points = sorted(must)
    others = [(i, a) for i in range(1, len(events) + 1) for a in (False, True) if (i, a) not in must]
    points += rng.sample(others, max(0, min(len(others), trials - len(points))))
    return points


def main() -> None:
    src_model, work, seed, trials = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    rng = random.Random(seed)
    model_a, model_b, src = work / "model_a", work / "model_b", work / "src"
    shutil.copytree(src_model, model_a)
    _changed_copy(model_a, model_b)
    shutil.copytree(model_a, src)
    ref_a = _contents(convert(src, work / "ref_a", progress=False))
    _put(model_b, src)
    ref_b = _contents(convert(src, work / "ref_b", progress=False))
    _put(model_a, src)
    events_file = work / "events.json"
    assert _run_child(src, work / "count", 10**9, False, events_file) == 0
    events = json.loads(events_file.read_text())
    results = {"events": len(events), "kills": 0, "verified_after_kill": 0, "refused_after_kill": 0,
               "reruns_finished": 0, "reruns_refused_source_changed": 0, "source_changed_trials": 0,
               "wrong": []}  # fmt: skip
    for n, (at, after) in enumerate(_kill_points(events, rng, trials)):
        out = work / f"out{n}"
        change = n % 4 == 3
        code = _run_child(src, out, at, after)
        what = f"kill at event {at} ({events[at - 1]}, {'after' if after else 'before'})"
        results["kills"] += code == -signal.SIGKILL
        finished = False
        try:
            verify(out)
            finished = True
            results["verified_after_kill"] += 1
            if _contents(out) != ref_a:
                results["wrong"].append(f"{what}: verifies but differs from the reference")
        except (VerifyError, FileNotFoundError):
            results["refused_after_kill"] += 1
        if change:
            _put(model_b, src)
            results["source_changed_trials"] += 1
        try:
            convert(src, out, progress=False)
            verify(out)
            if _contents(out) != (ref_b if change else ref_a):
                results["wrong"].append(f"{what}: the rerun differs from the reference")
            else:
                results["reruns_finished"] += 1
        except FileExistsError as e:
            if not (change and finished and "before it changed" in str(e)):
                results["wrong"].append(f"{what}: rerun refused: {e}")
            else:  # finished before the source changed: never overwritten, said clearly
                results["reruns_refused_source_changed"] += 1
        except Exception as e:
            results["wrong"].append(f"{what}: rerun failed: {type(e).__name__}: {e}")
        stale = [p.name for p in work.glob(f".{out.name}.sepweight-new-*")]
        if stale or list(out.glob(".*")):
            results["wrong"].append(f"{what}: left {stale or [p.name for p in out.glob('.*')]}")
        if change:
            _put(model_a, src)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
