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
            "opcomp.finite",
            "opcomp.capture",
            "opcomp.capture_ops",
            "opcomp.state",
            "opcomp.autograd",
            "opcomp.quiet",
            "opcomp.closure",
            "opcomp.skips",
            "opcomp.settings",
        ],
    ),
    ("layers", ["opcomp.layers"]),
    ("kernels", ["opcomp.kernels"]),
    ("plan", ["opcomp.head", "opcomp.plan", "opcomp.report", "opcomp.checkpoint"]),
    ("step", ["opcomp.step"]),
    ("optimizer", ["opcomp.optimizer"]),
    ("building", ["opcomp.rules", "opcomp.builder"]),
    ("integrations", ["opcomp.integrations"]),
    ("comparison", ["opcomp.comparison"]),
    ("tools", ["opcomp.cli", "opcomp.bench"]),
]
PUBLIC_API_USERS = {"integrations", "tools"}  # may import the package root, opcomp/__init__


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(name: str) -> int:
    for index, (_, prefixes) in enumerate(ROOMS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{name} belongs to no room: add it to ROOMS and to docs/architecture.md")


def typing_only_imports(tree: ast.AST) -> set[int]:
    """The import statements under ``if TYPE_CHECKING:`` (by id)."""
    return {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for inner in ast.walk(node)
        if isinstance(inner, (ast.Import, ast.ImportFrom))
    }


def imported(path: Path) -> list[str]:
    """Every opcomp module ``path`` imports, at the top or inside a function, under ``if
    TYPE_CHECKING:`` too (an import for annotations alone still ties the two modules): a name
    imported from a package is the submodule when there is one."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in NAMES]
    return [n for n in names if n == "opcomp" or n.startswith("opcomp.")]


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)
NAMES = {module_name(p) for p in PACKAGE.rglob("*.py")}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_module_imports_from_a_room_above_it(path):
    own = room(module_name(path))
    for name in imported(path):
        if name == "opcomp" or (name.count(".") == 1 and name.split(".")[1] in opcomp.__all__ and name not in NAMES):
            assert ROOMS[own][0] in PUBLIC_API_USERS, f"{module_name(path)} imports the package root ({name})"
            continue
        target = room(name)
        assert target <= own, f"{module_name(path)} ({ROOMS[own][0]}) imports {name} ({ROOMS[target][0]})"


GENERIC_STEP = sorted(p for p in (PACKAGE / "step").glob("*.py") if p.name != "fused.py")  # fused: AdamW's own route


@pytest.mark.parametrize("path", GENERIC_STEP, ids=lambda p: p.name)
def test_the_step_knows_operators_only_through_their_specs_and_never_the_optimizer(path):
    source = path.read_text(encoding="utf-8")
    strings = {n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not strings & set(opcomp.REGISTRY.names()), f"{path.name} names an operator"
    assert "optimizer." not in source and "optimizer._" not in source


def import_graph() -> dict[str, set[str]]:
    """Module -> the opcomp modules it imports (the package root included)."""
    return {module_name(p): {n for n in imported(p) if n in NAMES} for p in PACKAGE.rglob("*.py")}


def loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import loops: strongly connected sets of more than one module (a package importing its own
    submodules, as ``kernels.load`` does, is no loop)."""
    order, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(module: str) -> None:
        order[module] = low[module] = counter[0]
        counter[0] += 1
        stack.append(module)
        on.add(module)
        for target in graph[module]:
            if target not in order:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on:
                low[module] = min(low[module], order[target])
        if low[module] == order[module]:
            component = []
            while True:
                top = stack.pop()
                on.discard(top)
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in order:
            visit(module)
    return found


def test_no_import_loop_anywhere_in_the_package_within_a_room_or_across():
    assert loops(import_graph()) == []


def test_the_loop_finder_finds_a_loop_inside_one_room():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert loops(graph) == [["a", "b", "c"]]
    assert loops({"a": {"b"}, "b": set()}) == []


def test_no_import_is_for_type_checking_only():
    """Every import is a real dependency: none hides a loop behind ``if TYPE_CHECKING:``."""
    counted = {module_name(p): len(typing_only_imports(ast.parse(p.read_text(encoding="utf-8")))) for p in MODULES}
    assert {m: n for m, n in counted.items() if n} == {}


STEP_PATH = [
    "opcomp.optimizer",
    "opcomp.step",
    "opcomp.closure",
    "opcomp.state",
    "opcomp.finite",
    "opcomp.layers",
    "opcomp.kernels",
]


def test_the_optimizer_class_fits_on_a_page_and_no_function_of_the_step_path_is_long():
    tree = ast.parse((PACKAGE / "optimizer.py").read_text(encoding="utf-8"))
    (optimizer,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Optimizer"]
    assert optimizer.end_lineno - optimizer.lineno + 1 <= 250
    long = []
    for path in MODULES:
        if not any(module_name(path) == p or module_name(path).startswith(p + ".") for p in STEP_PATH):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{module_name(path)}.{node.name}")
    assert long == []


def test_the_room_table_in_docs_architecture_is_the_one_checked_here():
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = [line.split("|")[1:3] for line in text.splitlines() if line.startswith("| ") and "`" in line]
    documented = [
        (room.strip(), sorted("opcomp." + m.strip().strip("`/") for m in modules.split(", "))) for room, modules in rows
    ]
    assert documented == [(room, sorted(prefixes)) for room, prefixes in ROOMS]
