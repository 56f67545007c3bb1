"""The conversion journal: what makes an interrupted conversion resumable, and trusted for nothing.

The journal (`.sepweight-partial.json` inside the output directory) records the job (source kind and name,
dtype), the source's fingerprint (each source file's path, size, mtime and the SHA-256 of its first and
last MiB, plus the planned tensors) and the files finished with their size and SHA-256. A resume whose
source fingerprint differs restarts from an empty directory; finished files are re-hashed before they are
kept. In-memory sources (state dicts) have no fingerprint and always restart.

The output directory never exists without its journal: a new directory is made beside it under a hidden
name, the journal written into it, then renamed into place. The journal is removed only after
`manifest.json`; a directory with both is finished by checking it (`verify`) and removing the journal.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from llm_sepweight import format as fmt

logger = logging.getLogger(__name__)

JOURNAL = fmt.JOURNAL
_EDGE = 1 << 20  # bytes hashed at each end of a source file


def file_identity(path: Path) -> dict[str, Any]:
    """Path, size, mtime and the SHA-256 of the first and last MiB of one source file."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_EDGE))
        if st.st_size > 2 * _EDGE:
            f.seek(st.st_size - _EDGE)
        h.update(f.read(_EDGE))
    return {
        "path": str(path.resolve()),
        "bytes": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "edges_sha256": h.hexdigest(),
    }


def fingerprint(files: list[Path], plan: Any) -> tuple[str, list[dict[str, Any]]]:
    """One digest of the source files' identities and the planned tensors (JSON-able `plan`), and the identities."""
    ids = [file_identity(p) for p in sorted(files)]
    blob = json.dumps({"files": ids, "plan": plan}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest(), ids


def what_changed(before: Any, now: list[dict[str, Any]]) -> str:
    """Which source file differs between two identity lists (for the log line of a restart)."""
    old = {i.get("path"): i for i in before if isinstance(i, dict)} if isinstance(before, list) else {}
    for ident in now:
        prior = old.get(ident["path"])
        if prior is None:
            return f"{ident['path']} is new"
        for key in ("bytes", "mtime_ns", "edges_sha256"):
            if prior.get(key) != ident[key]:
                return f"{ident['path']}: {key} {prior.get(key)} -> {ident[key]}"
    gone = sorted(str(p) for p in set(old) - {i["path"] for i in now})
    return f"{gone[0]} is gone" if gone else "the planned tensors differ"


def read_journal(out: Path) -> dict[str, Any]:
    try:
        journal = json.loads((out / JOURNAL).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        logger.warning("%s: unreadable conversion journal (%s); restarting the conversion", out / JOURNAL, e)
        return {}
    return journal if isinstance(journal, dict) else {}


def write_journal(out: Path, job: dict[str, Any], done: dict[str, Any]) -> None:
    fmt.atomic_write_json(out / JOURNAL, {**job, "done": done})


def same_job(record: dict[str, Any], job: dict[str, Any]) -> bool:
    """Same source (kind, name) and dtype: the fingerprint is compared separately."""
    return record.get("source") == job["source"] and record.get("dtype") == job["dtype"]


def create_with_journal(out: Path, job: dict[str, Any]) -> None:
    """Make `out` so that it never exists without its journal (temporary directory, then rename)."""
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_new_dirs(out)
    if out.is_dir():  # an empty directory given by the user: the journal goes straight in
        write_journal(out, job, {})
        return
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.sepweight-new-", dir=parent))
    try:
        write_journal(tmp, job, {})
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fmt.fsync_dir(parent)


def remove_stale_new_dirs(out: Path) -> None:
    """Hidden directories left by a conversion killed before its rename (they hold a journal at most)."""
    for stale in out.parent.glob(f".{out.name}.sepweight-new-*"):
        if stale.is_dir() and all(p.name in (JOURNAL, f".{JOURNAL}.tmp") for p in stale.iterdir()):
            shutil.rmtree(stale, ignore_errors=True)


def clear(out: Path) -> None:
    """Empty a directory this library is converting into (it held only our files), keeping it."""
    for p in out.iterdir():
        if p.is_dir() and not p.is_symlink():
            raise FileExistsError(f"{out}: holds a subdirectory {p.name!r}; not clearing it, remove {out}")
    for p in out.iterdir():
        if p.name != JOURNAL:
            p.unlink()
    fmt.fsync_dir(out)


def is_done(out: Path, file: str, entry: Any) -> bool:
    """A finished file is kept only when its size and SHA-256 are still the journal's."""
    from llm_sepweight.verify import sha256_file

    if not isinstance(entry, dict):
        return False
    path = out / file
    with contextlib.suppress(OSError):
        if path.is_file() and not path.is_symlink() and path.stat().st_size == entry.get("bytes"):
            return sha256_file(path) == entry.get("sha256")
    return False
