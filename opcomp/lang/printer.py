"""Print a syntax tree back to source text.

``to_source`` prints exactly what the tree holds (aliases, flags and missing options stay as they
are), with the fewest parentheses that make ``parse(to_source(e)) == e``. The canonical printer,
``opcomp.format``, is ``to_source`` applied to the canonical tree (see ``opcomp.resolve``).

Printing is iterative, so very long or deep trees never hit Python's recursion limit, and the
graph reuses :func:`render` to build each node's key from its inputs' keys without reprinting.
"""

from __future__ import annotations

from opcomp.lang.ast import Call, Expr, Fallback, Name, Neg, Num, Product, Sum, children

# Binding strength, loosest first. A child printed inside a parent of precedence P needs
# parentheses when its own precedence is not above P (all binary forms are flat, never nested).
FALLBACK, SUM, PRODUCT, UNARY, ATOM = range(1, 6)

Printed = tuple[str, int]  # text and its precedence


def number_text(value: int | float) -> str:
    """``int`` prints plainly; ``float`` via repr, which always shows '.', or 'e', and round-trips."""
    return str(value) if isinstance(value, int) else repr(float(value))


def _wrap(child: Printed, above: int) -> str:
    text, precedence = child
    return text if precedence > above else f"({text})"


def render(expr: Expr, kids: list[Printed]) -> Printed:
    """Print one node given its children already printed (in :func:`children` order)."""
    if isinstance(expr, Num):
        text = number_text(expr.value)
        return text, (UNARY if text.startswith("-") else ATOM)
    if isinstance(expr, Name):
        return expr.name, ATOM
    if isinstance(expr, Call):
        values = iter(kids)
        text = expr.name
        if expr.options:
            items = [o.name if o.value is None else f"{o.name}={next(values)[0]}" for o in expr.options]
            text += "[" + ", ".join(items) + "]"
        if expr.args:
            text += "(" + ", ".join(arg[0] for arg in values) + ")"
        return text, ATOM
    if isinstance(expr, Neg):
        return "-" + _wrap(kids[0], UNARY - 1), UNARY
    if isinstance(expr, Product):
        return " * ".join(_wrap(k, PRODUCT) for k in kids), PRODUCT
    if isinstance(expr, Sum):
        text = _wrap(kids[0], SUM)
        for op, kid in zip(expr.ops, kids[1:]):
            text += f" {op} {_wrap(kid, SUM)}"
        return text, SUM
    if isinstance(expr, Fallback):
        return " | ".join(_wrap(k, FALLBACK) for k in kids), FALLBACK
    raise TypeError(f"not an expression node: {expr!r}")


def to_source(expr: Expr) -> str:
    """The text of ``expr``; ``parse(to_source(e)) == e`` for every tree."""
    done: dict[int, Printed] = {}
    stack: list[tuple[Expr, bool]] = [(expr, False)]
    while stack:
        node, expanded = stack.pop()
        if id(node) in done:
            continue
        kids = children(node)
        if expanded:
            done[id(node)] = render(node, [done[id(k)] for k in kids])
        else:
            stack.append((node, True))
            stack.extend((k, False) for k in reversed(kids))
    return done[id(expr)][0]
