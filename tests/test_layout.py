"""The package's shape (docs/DESIGN.md, "Shape of the code"): small modules, imports one way.

A captured layer input reaches its solve without a call back up: the optimizer's core imports the
blocks, the blocks the layer helpers, never the other way. Read from the source with `ast`; nothing
is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tengrad_tf"
MODULES = sorted(PACKAGE.rglob("*.py"))
# The paper's model zoo is one catalogue of architectures, long by nature.
LONG_ALLOWED = {"models.py"}
MAX_LINES = 350
# What the optimizer's core is made of: the blocks and the layer helpers are below all of it.
CORE = {"preconditioned", "optimizer", "kfac", "directions", "step_length", "step", "binding",
        "output_grads", "resume", "reporting", "validation", "callbacks", "capture", "backward",
        "replay", "adaptive"}


def name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def imported(path: Path) -> set[str]:
    """The tengrad_tf modules `path` imports, as dotted names (`from tengrad_tf import x`:
    tengrad_tf.x; `from tengrad_tf.x import y`: tengrad_tf.x)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("tengrad_tf")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tengrad_tf"):
            if node.module == "tengrad_tf":
                out |= {f"tengrad_tf.{a.name}" for a in node.names}
            else:
                out.add(node.module)
    return out


@pytest.mark.parametrize("path", MODULES, ids=name)
def test_modules_are_small(path):
    if path.name in LONG_ALLOWED:
        return
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{name(path)} has {lines} lines: split it along its concepts"


@pytest.mark.parametrize("path", MODULES, ids=name)
def test_no_imports_inside_functions(path):
    """Imports at the top: a deferred import hides the module graph (and any cycle)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner = [n for n in ast.walk(function) if isinstance(n, (ast.Import, ast.ImportFrom))]
            assert not inner, f"{name(path)}.{function.name} imports inside its body"


@pytest.mark.parametrize("path", [p for p in MODULES if p.parent.name in ("blocks", "layers")],
                         ids=name)
def test_blocks_and_layers_never_import_the_core(path):
    up = {m for m in imported(path) if m.split(".")[1] in CORE}
    assert not up, f"{name(path)} imports {sorted(up)}: calls must point from the core down"


def test_layer_helpers_import_no_blocks():
    for path in (PACKAGE / "layers").glob("*.py"):
        down = {m for m in imported(path) if m.startswith("tengrad_tf.blocks")}
        assert not down, f"{name(path)} imports {sorted(down)}"


def test_recorded_data_imports_nothing_of_the_package():
    """record.py is the data capture fills and the optimizer reads: it depends on neither."""
    assert imported(PACKAGE / "record.py") == set()
