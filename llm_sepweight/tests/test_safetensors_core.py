"""The one safetensors reader: what `safetensors` accepts it accepts, what the format forbids it refuses."""

from __future__ import annotations

import contextlib
import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch
from safetensors.torch import save_file

from llm_sepweight.safetensors_file import (
    MAX_HEADER_BYTES,
    Header,
    MappedFile,
    SafetensorsError,
    SafetensorsFile,
    parse_header,
    read_header,
)


def _file(header: Any, data: bytes = b"", raw: bytes | None = None) -> bytes:
    body = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


def _t(dtype: str, shape: list[Any], begin: Any, end: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


GOOD = {"a": _t("F32", [2], 0, 8), "b": _t("I8", [3], 8, 11), "__metadata__": {"format": "pt"}}

# (case name, file bytes, what the error says): every one a file the format forbids
BAD: list[tuple[str, bytes, str]] = [
    (
        "overlap (aliased)",
        _file({"a": _t("F32", [2], 0, 8), "b": _t("F32", [1], 4, 8)}, b"\0" * 8),
        "overlaps",
    ),
    ("same span twice", _file({"a": _t("F32", [2], 0, 8), "b": _t("F32", [2], 0, 8)}, b"\0" * 8), "overlaps"),
    ("gap", _file({"a": _t("F32", [1], 0, 4), "b": _t("F32", [1], 8, 12)}, b"\0" * 12), "unaccounted"),
    ("gap at start", _file({"a": _t("F32", [1], 4, 8)}, b"\0" * 8), "unaccounted"),
    ("trailing bytes", _file({"a": _t("F32", [1], 0, 4)}, b"\0" * 9), "unaccounted trailing"),
    ("bytes, no tensors", _file({}, b"\0"), "unaccounted trailing"),
    ("truncated", _file({"a": _t("F32", [4], 0, 16)}, b"\0" * 8), "truncated"),
    ("negative dim", _file({"a": _t("F32", [-1, -4], 0, 16)}, b"\0" * 16), "negative dimension"),
    ("negative offset", _file({"a": _t("F32", [1], -4, 0)}, b""), "0 <= begin <= end"),
    ("reversed offsets", _file({"a": _t("F32", [0], 4, 0)}, b"\0" * 4), "0 <= begin <= end"),
    ("shape/bytes mismatch", _file({"a": _t("F32", [3], 0, 8)}, b"\0" * 8), "for shape"),
    ("shape not a list", _file({"a": _t("F32", "2", 0, 8)}, b"\0" * 8), "shape must be"),
    ("bool dim", _file({"a": _t("F32", [True], 0, 4)}, b"\0" * 4), "shape must be"),
    ("float dim", _file({"a": _t("F32", [1.0], 0, 4)}, b"\0" * 4), "shape must be"),
    (
        "three offsets",
        _file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 4]}}, b"\0" * 4),
        "data_offsets",
    ),
    ("string offsets", _file({"a": _t("F32", [1], "0", "4")}, b"\0" * 4), "data_offsets"),
    ("unknown dtype", _file({"a": _t("F17", [1], 0, 4)}, b"\0" * 4), "dtype must be"),
    ("dtype missing", _file({"a": {"shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "dtype must be"),
    ("entry not an object", _file({"a": [1, 2]}), "not an object"),
    ("metadata of ints", _file({"__metadata__": {"k": 1}}), "__metadata__"),
    ("metadata a list", _file({"__metadata__": ["k"]}), "__metadata__"),
    ("not an object", _file(None, raw=b"[1]"), "start with"),
    ("leading space", _file(None, raw=b' {"a": 1}'), "start with"),
    ("not utf-8", _file(None, raw=b'{"\xff": 1}'), "UTF-8"),
    ("not json", _file(None, raw=b"{nope"), "corrupted"),
    ("NaN", _file(None, raw=b'{"a": NaN}'), "NaN"),
    ("duplicate key", _file(None, raw=b'{"a": {}, "a": {}}'), "duplicate"),
    ("deep nesting", _file(None, raw=b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "nested"),
    ("deep metadata", _file(None, raw=b'{"__metadata__":' + b'{"k":' * 50 + b'"v"' + b"}" * 51), "nested"),
    ("header too large", struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", "exceeds"),
    ("header past the end", struct.pack("<Q", 1000) + b"{}", "does not fit"),
    ("huge header length", struct.pack("<Q", 2**64 - 1) + b"{}", "exceeds"),
    ("no header", b"\x01\x00", "no header"),
    ("empty", b"", "no header"),
]


@pytest.mark.parametrize(("case", "data", "message"), BAD, ids=[c for c, _, _ in BAD])
def test_forbidden_files_are_refused_naming_the_file(
    case: str, data: bytes, message: str, tmp_path: Path
) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    with pytest.raises(SafetensorsError, match=message) as err:
        Header.read(path)
    assert str(path) in str(err.value)
    with pytest.raises(SafetensorsError, match=message):
        parse_header(data, len(data))
    if case not in ("duplicate key",):  # serde keeps the last duplicate; we refuse (it would alias silently)
        with pytest.raises(Exception):  # noqa: B017 (the reference library refuses it too, in its own way)
            safetensors.safe_open(str(path), framework="pt")


def test_tensor_errors_name_the_tensor(tmp_path: Path) -> None:
    data = _file({"w.bad": _t("F32", [-2], 0, 0)})
    with pytest.raises(SafetensorsError, match=r"tensor 'w\.bad'"):
        parse_header(data, len(data), where="f.safetensors")


def test_files_safetensors_writes_are_accepted_and_read_zero_copy(tmp_path: Path) -> None:
    tensors = {
        "w": torch.randn(3, 5),
        "h": torch.randn(7).half(),
        "b": torch.randn(2, 2).bfloat16(),
        "i": torch.arange(5, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(3.0),
    }
    path = tmp_path / "ok.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "x"})
    header = Header.read(path)
    assert header.metadata == {"format": "pt", "note": "x"}
    assert header.file_size == path.stat().st_size
    assert sorted(header.tensors) == sorted(tensors)
    spans = sorted((i.start, i.stop) for i in header.tensors.values())
    assert spans[0][0] == header.data_start and spans[-1][1] == header.file_size
    infos, metadata = read_header(path)  # the older name keeps its meaning
    assert infos == header.tensors and metadata == header.metadata
    with SafetensorsFile(path) as f:
        for name, want in tensors.items():
            got = f.tensor(name)
            assert got.dtype == want.dtype and torch.equal(got, want), name
            assert f.tensors[name].dtype_name in ("F32", "F16", "BF16", "I64", "BOOL")
        w = f.tensors["w"]
        assert f.raw(w.start, w.stop).numel() == w.nbytes
        f.advise_willneed(w.start, w.stop)
        with pytest.raises(KeyError, match="nope"):
            f.tensor("nope")
        with pytest.raises(SafetensorsError, match="outside the file"):
            f.raw(0, header.file_size + 1)
    assert MappedFile is SafetensorsFile


def test_empty_file_of_no_tensors(tmp_path: Path) -> None:
    path = tmp_path / "none.safetensors"
    save_file({}, path)
    assert Header.read(path).tensors == {}
    safetensors.safe_open(str(path), framework="pt")


_TRUNCATE_AFTER_OPEN = textwrap.dedent(
    """
    import os, sys
    import torch
    from safetensors.torch import save_file
    from llm_sepweight.safetensors_file import SafetensorsError, SafetensorsFile
    path = sys.argv[1]
    save_file({"a": torch.arange(1 << 16, dtype=torch.float32), "b": torch.ones(1 << 16)}, path)
    f = SafetensorsFile(path)
    os.truncate(path, 4096)  # another process truncates the file after it was opened
    try:
        t = f.tensor("b")
        print("NO ERROR", float(t.sum()))
        sys.exit(2)
    except SafetensorsError as e:
        assert path in str(e) and "changed size" in str(e), e
    try:
        f.raw(0, 100)
        sys.exit(3)
    except SafetensorsError:
        pass
    print("OK")
    """
)


def test_truncation_after_open_is_an_error_not_a_sigbus(tmp_path: Path) -> None:
    # in a subprocess: a SIGBUS would kill it (returncode -7) instead of pytest
    path = tmp_path / "t.safetensors"
    r = subprocess.run(
        [sys.executable, "-c", _TRUNCATE_AFTER_OPEN, str(path)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "OK" in r.stdout, (r.returncode, r.stdout, r.stderr)


_LOAD_AFTER_TRUNCATION = textwrap.dedent(
    """
    import os, sys
    from llm_sepweight import Checkpoint
    from llm_sepweight.safetensors_file import SafetensorsError
    ckpt = Checkpoint(sys.argv[1])
    ckpt.load("1-2")  # maps mid.00001
    path = os.path.join(sys.argv[1], "mid.00001.safetensors")
    os.truncate(path, os.path.getsize(path) // 2)
    try:
        sd = ckpt.load("1-2")
        print("NO ERROR", sum(float(t.float().sum()) for t in sd.mid[1].values()))
        sys.exit(2)
    except SafetensorsError as e:
        assert "mid.00001.safetensors" in str(e), e
    print("OK")
    """
)


def test_checkpoint_load_after_truncation_is_an_error(tmp_path: Path) -> None:
    from sw_helpers import tiny

    from llm_sepweight import convert

    out = convert(tiny("llama"), tmp_path / "sw", progress=False)
    r = subprocess.run(
        [sys.executable, "-c", _LOAD_AFTER_TRUNCATION, str(out)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "OK" in r.stdout, (r.returncode, r.stdout, r.stderr)


def test_mutated_headers_raise_only_safetensors_error() -> None:
    import random

    from safetensors.torch import save

    data = save({"a": torch.randn(3, 4), "b": torch.zeros(0), "c": torch.arange(5)}, metadata={"k": "v"})
    rng = random.Random(3)
    for _ in range(3000):
        d = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            p, op = rng.randrange(len(d)), rng.random()
            if op < 0.5:
                d[p] = rng.randrange(256)
            elif op < 0.7:
                del d[p : p + rng.randint(1, 20)]
            else:
                d[p:p] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 10)))
        with contextlib.suppress(SafetensorsError):
            parse_header(bytes(d), len(d))
