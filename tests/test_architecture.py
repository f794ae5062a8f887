"""The package's rooms, bottom to top, and what may import what (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import opcomp

PACKAGE = Path(opcomp.__file__).parent

ROOMS = [
    ("text", ["opcomp._resources", "opcomp.errors", "opcomp.files", "opcomp.lang"]),
    ("catalogue", ["opcomp.ops"]),
    (
        "language",
        [
            "opcomp.definitions",
            "opcomp.resolve",
            "opcomp.graph",
            "opcomp.explain",
            "opcomp.catalogue",
            "opcomp.learning_rates",
        ],
    ),
    (
        "runtime basics",
        [
            "opcomp.precision",
            "opcomp.prediction",
            "opcomp.distributed",
            "opcomp.capture",
            "opcomp.state",
            "opcomp.autograd",
            "opcomp.quiet",
            "opcomp.closure",
            "opcomp.skips",
        ],
    ),
    ("kernels", ["opcomp.kernels"]),
    ("plan", ["opcomp.head", "opcomp.plan", "opcomp.report", "opcomp.checkpoint"]),
    ("step", ["opcomp.execute"]),
    ("optimizer", ["opcomp.optimizer"]),
    ("building", ["opcomp.rules", "opcomp.builder"]),
    ("integrations", ["opcomp.integrations"]),
    ("tools", ["opcomp.cli", "opcomp.bench"]),
]
PUBLIC_API_USERS = {"building", "integrations", "tools"}  # may import the package root, opcomp/__init__


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(name: str) -> int:
    for index, (_, prefixes) in enumerate(ROOMS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{name} belongs to no room: add it to ROOMS and to docs/architecture.md")


def imported(path: Path) -> list[str]:
    """Every opcomp module ``path`` imports at run time, at the top or inside a function (imports
    for type annotations only, under ``if TYPE_CHECKING:``, create no dependency)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    names = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names if node.module == "opcomp"]
    return [n for n in names if n == "opcomp" or n.startswith("opcomp.")]


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_module_imports_from_a_room_above_it(path):
    own = room(module_name(path))
    for name in imported(path):
        if name == "opcomp" or (name.count(".") == 1 and name.split(".")[1] in opcomp.__all__):
            assert ROOMS[own][0] in PUBLIC_API_USERS, f"{module_name(path)} imports the package root ({name})"
            continue
        target = room(name)
        assert target <= own, f"{module_name(path)} ({ROOMS[own][0]}) imports {name} ({ROOMS[target][0]})"


def test_the_executor_knows_operators_only_through_their_specs_and_never_the_optimizer():
    source = (PACKAGE / "execute.py").read_text(encoding="utf-8")
    strings = {n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not strings & set(opcomp.REGISTRY.names()), "execute.py names an operator"
    assert "optimizer." not in source and "optimizer._" not in source
