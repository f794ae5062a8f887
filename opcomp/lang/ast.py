"""The immutable syntax tree of an opcomp expression.

Nodes compare and hash by content only; ``span`` (where the node was written) is carried along
for error messages but never takes part in equality, so ``parse(format(e)) == e`` is meaningful.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from opcomp.lang.source import Span


def _span() -> Span | None:
    return field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Num:
    """A number literal: ``int`` when written without '.' or exponent, else ``float``."""

    value: int | float
    span: Span | None = _span()

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)):
            raise TypeError(f"Num needs an int or float, got {self.value!r}")


@dataclass(frozen=True)
class Name:
    """A bare identifier: an operator applied to ``g``, a definition, an option or a word."""

    name: str
    span: Span | None = _span()


@dataclass(frozen=True)
class Option:
    """``name=value`` inside brackets; ``value`` is None for a bare flag such as ``[fisher]``."""

    name: str
    value: Expr | None = None
    span: Span | None = _span()


@dataclass(frozen=True)
class Call:
    """``name[options](args)``; at least one of options and args is present."""

    name: str
    options: tuple[Option, ...] = ()
    args: tuple[Expr, ...] = ()
    span: Span | None = _span()

    def __post_init__(self) -> None:
        if not self.options and not self.args:
            raise ValueError("a Call without options or arguments is written as a Name")


@dataclass(frozen=True)
class Neg:
    """``-operand``. A negated number literal is folded into ``Num`` by the parser."""

    operand: Expr
    span: Span | None = _span()

    def __post_init__(self) -> None:
        if isinstance(self.operand, Num):
            raise ValueError("a negated number is written as a negative Num")


@dataclass(frozen=True)
class Product:
    """``a * b * ...`` (two or more factors)."""

    factors: tuple[Expr, ...]
    span: Span | None = _span()

    def __post_init__(self) -> None:
        if len(self.factors) < 2:
            raise ValueError("a Product needs at least two factors")


@dataclass(frozen=True)
class Sum:
    """``terms[0] ops[0] terms[1] ...`` with each op '+' or '-', evaluated left to right."""

    terms: tuple[Expr, ...]
    ops: tuple[str, ...]
    span: Span | None = _span()

    def __post_init__(self) -> None:
        if len(self.terms) < 2 or len(self.ops) != len(self.terms) - 1:
            raise ValueError("a Sum needs n >= 2 terms and n - 1 operators")
        if any(op not in ("+", "-") for op in self.ops):
            raise ValueError(f"Sum operators must be '+' or '-', got {self.ops!r}")


@dataclass(frozen=True)
class Fallback:
    """``a | b | ...``: per parameter, the first branch that applies."""

    branches: tuple[Expr, ...]
    span: Span | None = _span()

    def __post_init__(self) -> None:
        if len(self.branches) < 2:
            raise ValueError("a Fallback needs at least two branches")


Expr = Num | Name | Call | Neg | Product | Sum | Fallback


@dataclass(frozen=True)
class Definition:
    """``name[param=default, ...] = body`` from a .opc file."""

    name: str
    params: tuple[Option, ...]
    body: Expr
    span: Span | None = _span()


def children(expr: Expr) -> tuple[Expr, ...]:
    """Direct sub-expressions in source order (option values before arguments)."""
    if isinstance(expr, Call):
        values = tuple(o.value for o in expr.options if o.value is not None)
        return values + expr.args
    if isinstance(expr, Neg):
        return (expr.operand,)
    if isinstance(expr, Product):
        return expr.factors
    if isinstance(expr, Sum):
        return expr.terms
    if isinstance(expr, Fallback):
        return expr.branches
    return ()
