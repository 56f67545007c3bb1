"""The distributed subpackage's layout: its modules use each other's public names only, each stays readable
in size, and the old module paths still import (as deprecated aliases)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[1] / "src"
PIPELINE = SRC / "llm_model_parts" / "pipeline"


def private_imports(path: Path) -> list[str]:
    """`from llm_model_parts... import _name` and `module._name` reads of an imported package module."""
    tree = ast.parse(path.read_text())
    found = []
    modules: set[str] = set()  # local names bound to llm_model_parts modules
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (
            node.level or (node.module or "").startswith("llm_model_parts")
        ):
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"{path.name}:{node.lineno} imports {alias.name} from {node.module}")
                modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("llm_model_parts"):
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
        ):
            found.append(f"{path.name}:{node.lineno} reads {node.value.id}.{node.attr}")
    return found


def test_pipeline_modules_import_public_names_only() -> None:
    files = sorted(PIPELINE.glob("*.py"))
    assert {p.stem for p in files} >= {"driver", "worker", "stage", "transport", "handshake", "launch"}
    found = [f for p in files for f in private_imports(p)]
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_the_checker_finds_private_imports(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from llm_model_parts.pipeline.stage import _Caches, Stage\n"
        "from . import driver\n"
        "def f(d):\n    return driver._Guard, d._failure\n"
    )
    found = private_imports(bad)
    assert len(found) == 2, found
    assert "_Caches" in found[0] and "driver._Guard" in found[1]


def test_no_module_reads_another_objects_private_attribute() -> None:
    """serve.py used to read `driver._failure`: no attribute of an object other than `self`/`cls` that
    starts with one underscore is read in the subpackage, except on the module's own classes' instances."""
    found = []
    for path in sorted(PIPELINE.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id not in ("self", "cls", "torch", "_thread")
            ):
                found.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
    assert not found, found


def test_pipeline_files_stay_small() -> None:
    long = {p.name: n for p in PIPELINE.glob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


@pytest.mark.parametrize("old", ["stage", "transport", "worker", "plan"])
def test_old_module_paths_are_deprecated_aliases(old: str) -> None:
    sys.modules.pop(f"llm_model_parts.{old}", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(f"llm_model_parts.{old}")
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    new = importlib.import_module(f"llm_model_parts.pipeline.{old}")
    for name in module.__all__:
        assert getattr(module, name) is getattr(new, name, getattr(module, name))


def test_public_names_keep_working() -> None:
    import llm_model_parts
    import llm_model_parts.pipeline as pipeline

    for name in ("PipelineDriver", "start_pipeline", "Stage", "StageInfo", "PipelineError", "PipelineTimeout",
                 "RemoteError", "run_worker", "plan_split"):  # fmt: skip
        assert getattr(llm_model_parts, name) is getattr(pipeline, name)
    # what the old `llm_model_parts.pipeline` module exported
    for name in ("OUTPUTS", "backend_for", "init_distributed", "load_stage", "parse_plan"):
        assert hasattr(pipeline, name)


def test_launcher_entry_points_parse_arguments() -> None:
    for module in ("llm_model_parts.serve", "llm_model_parts.pipeline.serve"):
        result = subprocess.run(
            [sys.executable, "-W", "error::DeprecationWarning", "-m", module, "--help"],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert "--plan" in result.stdout


def test_stages_own_a_cache_per_micro_batch_and_leave_the_part_stateless() -> None:
    """A one-process driver over a real tiny part (micro-batches, chunks, left padding, rewind, reset, packed)
    gives the incremental forward_func's logits, and the Part itself never holds a cache."""
    from parts_testlib import fixtures

    from llm_model_parts import PipelineDriver, load_part
    from llm_model_parts.pipeline import stage_from_part

    part = load_part(fixtures.tiny_checkpoint("llama"), "f")
    driver = PipelineDriver(stage_from_part(part, max_seq_len=32), world=1, micro_batches=2, prefill_chunk=3)
    ref = part.as_forward_func(max_seq_len=32)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :2] = 0
    torch.testing.assert_close(
        driver(ids, attention_mask=mask), ref(ids, attention_mask=mask), atol=1e-5, rtol=0
    )
    for _ in range(3):
        nxt = torch.randint(3, 200, (3, 1), generator=g)
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        torch.testing.assert_close(
            driver(nxt, attention_mask=mask), ref(nxt, attention_mask=mask), atol=1e-5, rtol=0
        )
    assert driver.seq_len == ref.seq_len == 10
    driver.rewind(2)
    ref.rewind(2)
    nxt = torch.randint(3, 200, (3, 1), generator=g)
    mask = mask[:, :-1]
    torch.testing.assert_close(
        driver(nxt, attention_mask=mask), ref(nxt, attention_mask=mask), atol=1e-5, rtol=0
    )
    assert getattr(part, "cache", None) is None  # the deprecated per-part cache was never set up
    driver.reset()
    ref.reset()
    ids = torch.randint(3, 200, (1, 5), generator=g)  # a new batch size after reset
    torch.testing.assert_close(driver(ids), ref(ids), atol=1e-5, rtol=0)
    packed = torch.randint(3, 200, (1, 3), generator=g)
    pos = torch.tensor([[5, 6, 6]])
    tree = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 0, 1]]], dtype=torch.bool)
    torch.testing.assert_close(
        driver.forward_packed(packed, pos, tree), ref.forward_packed(packed, pos, tree), atol=1e-5, rtol=0
    )
    assert driver.seq_len == ref.seq_len == 5


def test_corrupt_headers_end_in_pipeline_errors() -> None:
    from llm_model_parts.pipeline.transport import MAX_DIMS, Command, Header, PipelineError

    good = Header(Command.FORWARD, 0, 0, ((torch.float32, (1, 2, 3)),)).encode()
    for index, value in ((5, 1000), (5, -1), (10, -4)):  # payload count, payload count, a dimension
        bad = good.clone()
        bad[index] = value
        with pytest.raises(PipelineError, match="corrupt header"):
            Header.decode(bad, peer=1)
    assert MAX_DIMS >= 3
