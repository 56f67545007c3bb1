"""The package's import graph: no cycles (lazy imports inside functions count; `if TYPE_CHECKING:` ones do
not), every module imports on its own, and no module reads the untyped `config.raw`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "llm_model_parts"

# Imported alone in a fresh interpreter (each costs a torch import, so the modules an order dependency
# would break first: the config types, the family registry and the families, the layers they share).
ALONE = (
    "llm_model_parts.config",
    "llm_model_parts.family",
    "llm_model_parts.families.deepseek_v3",
    "llm_model_parts.layers.alibi",
    "llm_model_parts.weights",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules `name` imports anywhere in its body (`from a.b import c` is `a.b.c` when that is
    a module, else `a.b`); the implicit import of parent packages is not an edge."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _type_checking_only(node):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                target = f"{base}.{alias.name}"
                out.add(target if target in known else base)
    return {m for m in out if m in known and m != name}


def cycles() -> list[list[str]]:
    mods = modules()
    known = set(mods)
    graph = {name: imports_of(name, path, known) for name, path in mods.items()}
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    return found


def test_no_import_cycles() -> None:
    found = [" -> ".join(c) for c in cycles()]
    assert not found, "import cycles:\n" + "\n".join(found)


def test_the_cycle_finder_finds_cycles(tmp_path: Path) -> None:
    """The finder itself: a.py imports b lazily, b.py imports a."""
    (tmp_path / "a.py").write_text("def f():\n    from pkg import b\n")
    (tmp_path / "b.py").write_text("from pkg.a import f\n")
    known = {"pkg.a", "pkg.b"}
    assert imports_of("pkg.a", tmp_path / "a.py", known) == {"pkg.b"}
    assert imports_of("pkg.b", tmp_path / "b.py", known) == {"pkg.a"}


@pytest.mark.parametrize("name", ALONE)
def test_module_imports_on_its_own(name: str) -> None:
    """Each module imports first in a fresh interpreter (an import-order dependency would fail here)."""
    result = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_no_module_reads_config_raw() -> None:
    readers = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "raw":
                readers.append(f"{name}:{node.lineno}")
    assert not readers, f"config.raw is read at {readers}"
