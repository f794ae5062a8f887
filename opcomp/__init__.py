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
    OpcompSyntaxError,
    OptionValueError,
    UnknownNameError,
    UnknownOptionError,
)
from opcomp.graph import Graph, Node, build_graph
from opcomp.lang.ast import Call, Expr, Fallback, Name, Neg, Num, Product, Sum
from opcomp.lang.parser import parse
from opcomp.lang.printer import to_source
from opcomp.ops import REGISTRY
from opcomp.resolve import canonicalize

__all__ = [
    "REGISTRY",
    "Optimizer",
    "build",
    "ArityError",
    "CompositionError",
    "DefinitionError",
    "Expr",
    "Graph",
    "Namespace",
    "Node",
    "OpcompError",
    "OpcompSyntaxError",
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


def _expr(expr: Expr | str) -> Expr:
    if isinstance(expr, str):
        return parse(expr)
    if isinstance(expr, (Call, Fallback, Name, Neg, Num, Product, Sum)):
        return expr
    raise OpcompError(f"expected an expression as text or from opcomp.parse, got {type(expr).__name__}")


def format(expr: Expr | str, namespace: Namespace | None = None) -> str:  # noqa: A001 - the printer's name
    """The canonical text of an expression: aliases resolved, definitions expanded, every option explicit.

    The expression is fully checked on the way (it is ``lower(expr).canonical``).
    """
    return lower(expr, namespace).canonical


def lower(expr: Expr | str, namespace: Namespace | None = None) -> Graph:
    """The checked graph of an expression, equal sub-expressions shared (``namespace``: presets by default)."""
    return build_graph(canonicalize(_expr(expr), namespace))


def __getattr__(name: str):
    """``build`` and ``Optimizer`` import torch, so they load on first use: the language alone stays light."""
    if name == "build":
        from opcomp.builder import build

        return build
    if name == "Optimizer":
        from opcomp.optimizer import Optimizer

        return Optimizer
    raise AttributeError(f"module 'opcomp' has no attribute {name!r}")
