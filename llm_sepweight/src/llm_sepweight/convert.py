"""`convert`: write a sepweight directory from an HF directory, a GGUF file, .pth files or a state dict.

Streaming: one output file at a time, one tensor at a time, so memory stays at the largest tensor plus a
constant. Atomic and restartable: every file is written beside its final name and renamed after fsync,
a journal records finished files, and manifest.json (what makes the directory valid) is written last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from llm_sepweight import format as fmt
from llm_sepweight import journal
from llm_sepweight.names import Location, num_layers_of, rule_for, split_names
from llm_sepweight.safetensors_file import DTYPE_NAMES, read_header, read_tensor
from llm_sepweight.safetensors_write import StreamWriter
from llm_sepweight.sources import (
    Decider,
    Source,
    SourceTensor,
    hf_source,
    legacy_dir_source,
    pth_source,
    state_dict_source,
)

logger = logging.getLogger(__name__)

JOURNAL = journal.JOURNAL


def convert(
    src: str | Path | Mapping[str, torch.Tensor] | list[str | Path],
    out: str | Path,
    *,
    dtype: torch.dtype | None = None,
    decider: Decider | None = None,
    config: dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Convert `src` into the sepweight directory `out` and return its path.

    `src`: an HF checkpoint directory, a `.gguf` file, an llm_sepweight 0.10 directory, a `.pth` file or a
    list of them, or an in-memory state dict. `.pth` files and state dicts need `decider` (the 0.10
    function `key -> ["start", name] | ["mid", "<layer>", name] | ["end", name]`); `config` gives them a
    config.json. `dtype` stores floating tensors in that dtype. A finished `out` is never overwritten;
    an interrupted conversion into `out` is resumed.
    """
    source = open_source(src, decider=decider, config=config)
    return write(source, Path(out), dtype=dtype, progress=progress)


def open_source(
    src: str | Path | Mapping[str, torch.Tensor] | list[str | Path],
    *,
    decider: Decider | None = None,
    config: dict[str, Any] | None = None,
) -> Source:
    if isinstance(src, Mapping):
        if decider is None:
            raise ValueError("converting an in-memory state dict needs decider= (key -> section path)")
        return state_dict_source(src, decider, config, "<state dict>")
    if isinstance(src, list):
        paths = [Path(p) for p in src]
    else:
        path = Path(src)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or directory to convert")
        if path.is_file() and path.suffix == ".gguf":
            from llm_sepweight.gguf import gguf_source

            source = gguf_source(path)
            source.files = source.files or [path]
            return source
        if path.is_dir() and (path / "config.json").is_file() and not fmt.is_sepweight_dir(path):
            return hf_source(path)
        if path.is_dir() and ((path / "begin.pth").is_file() or any(path.glob("mid.*.pth"))):
            return legacy_dir_source(path)
        if path.is_dir() and fmt.is_sepweight_dir(path):
            raise ValueError(f"{path}: already a sepweight directory; load it with Checkpoint or load")
        if path.is_dir() and decider is not None:
            paths = sorted(p for p in path.glob("*.pth") if not p.name.startswith("."))
        elif path.is_file() and path.suffix in (".pth", ".pt", ".bin"):
            paths = [path]
        else:
            raise ValueError(
                f"{path}: cannot convert: expected an HF checkpoint directory (config.json + weights), a .gguf "
                "file, an llm_sepweight 0.10 directory, or .pth files with decider="
            )
    if decider is None:
        raise ValueError(
            f"converting .pth files {[str(p) for p in paths]} needs decider= (key -> section path)"
        )
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such .pth file")
    if not paths:
        raise FileNotFoundError(f"{src}: no .pth files to convert")
    return pth_source(paths, decider, config)


# --- planning -------------------------------------------------------------------------------------------


def plan(
    source: Source, dtype: torch.dtype | None
) -> tuple[dict[str, list[tuple[str, SourceTensor]]], dict[str, Any]]:
    """Output file -> [(name in part, source tensor)], and the manifest fields that do not depend on the bytes."""
    architecture = str(source.config.get("model_type", "")) or None
    num_layers = num_layers_of(source.config)
    located: dict[str, Location] = {}
    by_name = {t.name: t for t in source.tensors}
    if all(t.location is not None for t in source.tensors):
        located = {t.name: t.location for t in source.tensors if t.location is not None}
    else:
        located = split_names(architecture, by_name, num_layers)
    files: dict[str, list[tuple[str, SourceTensor]]] = defaultdict(list)
    for name, loc in located.items():
        file = (
            fmt.mid_file(loc.layer)
            if loc.section == "mid" and loc.layer is not None
            else f"{loc.section}.safetensors"
        )
        if any(n == loc.name for n, _ in files[file]):
            raise ValueError(f"two source tensors map to {loc.name!r} in {file} (the second is {name!r})")
        files[file].append((loc.name, by_name[name]))
    layers = sorted(int(f.split(".")[1]) for f in files if f.startswith("mid."))
    if num_layers is None:
        num_layers = layers[-1] + 1 if layers else 0
    missing = sorted(set(range(num_layers)) - set(layers))
    if missing:
        raise ValueError(f"{source.name}: no tensors for layers {missing[:5]} of {num_layers}")
    tied = _add_tied_head(source, files)
    meta = {
        "architecture": architecture or "",
        "num_layers": num_layers,
        "config": source.config,
        "tied_embeddings": tied,
        "source": {"kind": source.kind, "name": source.name},
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
    }
    return dict(files), meta


def _add_tied_head(source: Source, files: dict[str, list[tuple[str, SourceTensor]]]) -> bool:
    end = files.get(fmt.END_FILE, [])
    if any(name == "lm_head.weight" for name, _ in end) or not files.get(fmt.BEGIN_FILE):
        return False
    if source.kind in ("state_dict", "pth") and not source.config.get("tie_word_embeddings"):
        return False  # a decider said where everything goes: tie only when the config asks for it
    architecture = str(source.config.get("model_type", "")) or None
    try:
        embedding = rule_for(architecture, [t.name for t in source.tensors]).embedding
    except ValueError:
        embedding = "embed_tokens.weight"
    for name, tensor in files[fmt.BEGIN_FILE]:
        if name == embedding:
            files.setdefault(fmt.END_FILE, []).append(("lm_head.weight", tensor))
            return True
    return False


def _read_tied_head_from_begin(
    files: dict[str, list[tuple[str, SourceTensor]]], begin: Path, dtype: torch.dtype | None
) -> None:
    """The tied head copies the embedding bytes already written to begin (no second dequantization)."""
    end = files[fmt.END_FILE]
    for index, (name, tensor) in enumerate(end):
        if name != "lm_head.weight":
            continue
        embedding = next(n for n, t in files[fmt.BEGIN_FILE] if t is tensor)

        def read(embedding: str = embedding) -> torch.Tensor:
            info = read_header(begin)[0][embedding]
            with open(begin, "rb") as f:
                return read_tensor(f, info)

        end[index] = (name, SourceTensor(tensor.name, _out_dtype(tensor, dtype), tensor.shape, read))


def _out_dtype(t: SourceTensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and t.dtype.is_floating_point else t.dtype


# --- writing --------------------------------------------------------------------------------------------


def write(source: Source, out: Path, *, dtype: torch.dtype | None = None, progress: bool = True) -> Path:
    files, meta = plan(source, dtype)
    fingerprint, identities = _fingerprint(source, files, dtype)
    job = {"source": meta["source"], "dtype": meta["dtype"], "fingerprint": fingerprint}
    job["source_files"] = identities  # each file's size, mtime and edge hash, for the log line of a restart
    done = _prepare_out(out, job)
    if done is None:
        return out
    if meta["tied_embeddings"]:
        _read_tied_head_from_begin(files, out / fmt.BEGIN_FILE, dtype)
    order = sorted(files, key=_file_order)
    todo = [f for f in order if not journal.is_done(out, f, done.get(f))]
    done = {f: done[f] for f in order if f not in todo}
    if done:
        logger.info("%s: resuming, %d of %d files already written", out, len(done), len(order))
    total = sum(_nbytes(t, dtype) for f in todo for _, t in files[f])
    with _progress(total, f"convert {Path(source.name).name}", progress) as bar:
        for file in todo:
            done[file] = _write_file(out / file, files[file], dtype, bar)
            journal.write_journal(out, job, done)
    others = {name: _write_other(out / name, content) for name, content in source.extra_files.items()}
    others["config.json"] = _write_other(out / "config.json", _json_bytes(source.config))
    meta["source"] = {**meta["source"], "fingerprint": job["fingerprint"] or ""}
    manifest = {
        "format": fmt.FORMAT,
        "version": fmt.VERSION,
        **meta,
        "files": {f: done[f] for f in order},
        "other_files": dict(sorted(others.items())),
    }
    fmt.atomic_write_json(out / fmt.MANIFEST, manifest)
    (out / journal.JOURNAL).unlink()
    fmt.fsync_dir(out)
    logger.info("%s: wrote %d files (%s layers)", out, len(order) + len(others), meta["num_layers"])
    return out


def _fingerprint(
    source: Source, files: dict[str, list[tuple[str, SourceTensor]]], dtype: torch.dtype | None
) -> tuple[str | None, list[dict[str, Any]]]:
    if not source.files:
        return None, []  # an in-memory source: nothing to recognise it by, so never resumed
    planned = {
        f: [(n, t.name, str(t.dtype), list(t.shape)) for n, t in ts] for f, ts in sorted(files.items())
    }
    return journal.fingerprint(source.files, {"plan": planned, "dtype": str(dtype)})


def _prepare_out(out: Path, job: dict[str, Any]) -> dict[str, Any] | None:
    """The finished files to keep (empty for a fresh start), or None when `out` holds this very conversion."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    has_journal = (out / journal.JOURNAL).is_file()
    record = journal.read_journal(out) if has_journal else {}
    if record and not journal.same_job(record, job):
        raise FileExistsError(
            f"{out}: holds an unfinished conversion of {record.get('source')} (dtype {record.get('dtype')}); "
            "resume it with the same arguments or choose another directory"
        )
    if fmt.is_sepweight_dir(out):
        if not has_journal:
            _finished(out, job)
            return None
        if _finish_killed_after_manifest(out, job):
            return None
        (out / fmt.MANIFEST).unlink()  # killed after a manifest that does not check out: redo the job
    if has_journal:
        if job["fingerprint"] is None or record.get("fingerprint") != job["fingerprint"]:
            if record.get("done"):
                why = journal.what_changed(record.get("source_files"), job["source_files"])
                logger.warning(
                    "%s: the source changed since the interrupted conversion (%s); restarting", out, why
                )
            journal.clear(out)
            journal.write_journal(out, job, {})
            return {}
        done = record.get("done")
        return dict(done) if isinstance(done, dict) else {}
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(
            f"{out}: exists, is not empty and is not a sepweight directory; not writing into it"
        )
    journal.create_with_journal(out, job)
    return {}


def _finished(out: Path, job: dict[str, Any]) -> None:
    """`out` is finished: this job's (nothing to do) or another's (an error: never overwritten)."""
    manifest = fmt.read_manifest(out)
    source = dict(manifest.get("source") or {})
    recorded = source.pop("fingerprint", None)
    if not journal.same_job({"source": source, "dtype": manifest.get("dtype")}, job):
        raise FileExistsError(f"{out}: already a sepweight directory of another source; not overwriting it")
    if recorded and job["fingerprint"] and recorded != job["fingerprint"]:
        raise FileExistsError(
            f"{out}: converted from {source.get('name')} before it changed; not overwriting it "
            "(remove it or choose another directory to convert the new version)"
        )
    logger.info("%s: already converted from %s", out, source.get("name"))


def _finish_killed_after_manifest(out: Path, job: dict[str, Any]) -> bool:
    """Manifest and journal both present: the job is finished when the manifest is this job's and checks out."""
    from llm_sepweight.verify import VerifyError, verify_contents

    if job["fingerprint"] is None:
        return False  # an in-memory source is never trusted to be the same: redo the job
    record = journal.read_journal(out)
    try:
        manifest = fmt.read_manifest(out)
        verify_contents(out, ignore=frozenset({journal.JOURNAL}))
    except (VerifyError, fmt.ManifestError):
        return False
    fingerprint = (manifest.get("source") or {}).get("fingerprint")
    if record.get("fingerprint") != job["fingerprint"] or fingerprint != (job["fingerprint"] or ""):
        return False
    (out / journal.JOURNAL).unlink()
    fmt.fsync_dir(out)
    return True


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode()


def _write_other(path: Path, content: bytes | Path) -> dict[str, Any]:
    """Copy (or write) a file beside the weights atomically, hashing what is written."""
    sha = hashlib.sha256()
    size = 0
    with fmt.atomic_open(path) as f:
        if isinstance(content, Path):
            with open(content, "rb") as src:
                while block := src.read(1 << 20):
                    f.write(block)
                    sha.update(block)
                    size += len(block)
        else:
            f.write(content)
            sha.update(content)
            size = len(content)
    return {"bytes": size, "sha256": sha.hexdigest()}


def _write_file(
    path: Path, tensors: list[tuple[str, SourceTensor]], dtype: torch.dtype | None, bar: Any
) -> dict[str, Any]:
    entries = [(name, _out_dtype(t, dtype), t.shape) for name, t in tensors]
    by_name = dict(tensors)

    with fmt.atomic_open(path) as f:
        writer = StreamWriter(f, entries)

        def produce() -> Iterator[tuple[str, torch.Tensor]]:
            for name in writer.order:
                source = by_name[name]
                t = source.read()
                if tuple(t.shape) != source.shape:
                    raise ValueError(
                        f"tensor {source.name!r}: read shape {list(t.shape)}, expected {list(source.shape)}"
                    )
                out_dtype = _out_dtype(source, dtype)
                if t.dtype != out_dtype:
                    t = t.to(out_dtype)
                yield name, t
                if bar is not None:
                    bar.update(t.numel() * t.element_size())

        writer.write_all(produce())
    tensor_list = [{"name": n, "dtype": DTYPE_NAMES[d], "shape": list(s)} for n, d, s in entries]
    return {"bytes": writer.size, "sha256": writer.sha.hexdigest(), "tensors": tensor_list}


def _file_order(file: str) -> tuple[int, str]:
    return ({"b": 0, "m": 1, "e": 2}[file[0]], file)


def _nbytes(t: SourceTensor, dtype: torch.dtype | None) -> int:
    n = _out_dtype(t, dtype).itemsize
    for d in t.shape:
        n *= d
    return n


@contextlib.contextmanager
def _progress(total: int, desc: str, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        logger.info("%s: %.1f MB to write (install tqdm for a progress bar)", desc, total / 1e6)
        yield None
        return
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc) as bar:
        yield bar
