"""opcomp: optimizers written as expressions over preconditioning operators.

>>> import opcomp
>>> opcomp.format("muon(kfac(grad))")[:40]
'muon[beta=0.95, nesterov=true, steps=5]('
>>> len([n for n in opcomp.lower("0.5 * adam(g) + 0.5 * muon(adam(g))").nodes if n.op == "adam"])
1
"""

from __future__ import annotations

from opcomp.definitions import Namespace, parse_definitions, presets
from opcomp.errors import (
    ArityError,
    CompositionError,
    DefinitionError,
    OpcompError,
    OpcompNotice,
    OpcompSyntaxError,
    OpcompTypeError,
    OpcompValueError,
    OpcompWarning,
    OptionValueError,
    UnknownNameError,
    UnknownOptionError,
)
from opcomp.graph import Graph, Node
from opcomp.graph import lower as lower_graph
from opcomp.lang.ast import Expr
from opcomp.lang.parser import parse
from opcomp.lang.printer import to_source
from opcomp.ops import REGISTRY

__all__ = [
    "REGISTRY",
    "Optimizer",
    "build",
    "compare",
    "Task",
    "ArityError",
    "CompositionError",
    "DefinitionError",
    "Expr",
    "Graph",
    "Namespace",
    "Node",
    "OpcompError",
    "OpcompSyntaxError",
    "OpcompTypeError",
    "OpcompValueError",
    "OpcompNotice",
    "OpcompWarning",
    "OptionValueError",
    "UnknownNameError",
    "UnknownOptionError",
    "format",
    "lower",
    "parse",
    "parse_definitions",
    "presets",
    "to_source",
]


def format(expr: Expr | str, namespace: Namespace | None = None) -> str:  # noqa: A001 - the printer's name
    """The canonical text of an expression: aliases resolved, definitions expanded, every option explicit.

    The expression is fully checked on the way (it is ``lower(expr).canonical``).
    """
    return lower(expr, namespace).canonical


def lower(expr: Expr | str, namespace: Namespace | None = None) -> Graph:
    """The checked graph of an expression, equal sub-expressions shared (``namespace``: presets by default)."""
    return lower_graph(expr, namespace)


def __getattr__(name: str):
    """``build``, ``Optimizer``, ``compare`` and ``Task`` import torch, so they load on first use: the
    language alone stays light."""
    if name == "compare":
        from opcomp.comparison.runs import compare

        return compare
    if name == "Task":
        from opcomp.comparison.tasks import Task

        return Task
    if name == "build":
        from opcomp.builder import build

        return build
    if name == "Optimizer":
        from opcomp.optimizer import Optimizer

        return Optimizer
    raise AttributeError(f"module 'opcomp' has no attribute {name!r}")
