"""The learning rate an expression gets when the caller gives none.

A preset carries its own (``# lr:`` above its definition). An operator carries one too (its
spec's ``lr``), and an expression takes the one of the operator that sets its update's scale: the
outermost, looking through operators whose spec says whose scale they keep (``scale_of``: ``sam``,
``clip``, ``reject`` their argument's, ``graft`` its second's),
through constant factors, and into the first branch of ``|``.
A sum of updates has no single scale and gets :data:`DEFAULT_LR`. Every value is measured: full
300-step runs on three tasks, chosen by validation loss (``python -m opcomp.bench.sweep``;
docs/presets.md has the table).
"""

from __future__ import annotations

from opcomp.definitions import Namespace, presets
from opcomp.errors import OpcompError
from opcomp.lang.ast import Call, Expr, Fallback, Name, Neg, Num, Product
from opcomp.lang.parser import parse
from opcomp.ops import REGISTRY

DEFAULT_LR = 1e-3


def recommended_lr(expr: str | Expr, namespace: Namespace | None = None) -> float:
    """The recommended learning rate of ``expr`` (see the module's docstring), else 1e-3;
    ``namespace``: the presets by default."""
    namespace = presets() if namespace is None else namespace
    try:
        tree = parse(expr) if isinstance(expr, str) else expr
    except OpcompError:
        return DEFAULT_LR  # the optimizer reports the mistake where it lowers the expression
    lr = _scale_setter(tree, namespace)
    return DEFAULT_LR if lr is None else lr


def _scale_setter(tree: Expr, namespace: Namespace) -> float | None:
    if isinstance(tree, (Name, Call)):
        arguments = tree.args if isinstance(tree, Call) else ()
        if tree.name in namespace and not arguments:
            return namespace.note(tree.name).lr
        spec = REGISTRY.get(tree.name)
        if spec is None:
            return None
        if spec.scale_of is not None:
            return _scale_setter(arguments[spec.scale_of], namespace) if arguments else REGISTRY["g"].lr
        return spec.lr
    if isinstance(tree, Fallback):
        return _scale_setter(tree.branches[0], namespace)
    if isinstance(tree, Neg):
        return _scale_setter(tree.operand, namespace)
    if isinstance(tree, Product):
        updates = [f for f in tree.factors if not isinstance(f, Num)]
        return _scale_setter(updates[0], namespace) if len(updates) == 1 else None
    return None
