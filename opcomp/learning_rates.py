"""The learning rate an expression gets when the caller gives none.

A preset carries its own (``# lr:`` above its definition). An operator carries one too (its
spec's ``lr``), and an expression takes the one of the operator that sets its update's scale: the
outermost, looking through operators whose spec says whose scale they keep (``scale_of``: ``sam``,
``clip``, ``reject`` their argument's, ``graft`` its second's),
through constant factors, and into the first branch of ``|``.
A sum of updates has no single scale and gets :data:`DEFAULT_LR`. Every value is measured: full
300-step runs on three tasks, chosen by validation loss (``python -m opcomp.bench.sweep``;
docs/presets.md has the table).

The rate may depend on what the model is (:func:`model_kind`): Adam's scale that suits a small CNN
or MLP (0.03) is three to ten times too large for a transformer or a convolutional network of a
million parameters or more, and SGD's and momentum's are three times too large for the latter. So
presets and operators carry rates for those kinds where they differ (``# lr_transformer:``,
``# lr_large_cnn:``, a spec's ``kind_lrs``), measured on the built-in text tasks and on ResNets.
"""

from __future__ import annotations

from torch import nn

from opcomp.definitions import Namespace, presets
from opcomp.errors import OpcompError
from opcomp.lang.ast import Call, Expr, Fallback, Name, Neg, Num, Product
from opcomp.lang.parser import parse
from opcomp.ops import REGISTRY

DEFAULT_LR = 1e-3
DEFAULT, TRANSFORMER, LARGE_CNN = "default", "transformer", "large_cnn"  # the kinds of model a rate can depend on
KINDS = (DEFAULT, TRANSFORMER, LARGE_CNN)
LARGE_CNN_PARAMETERS = 1_000_000  # the ResNets measured from 1.1M parameters up want the smaller rates; 0.31M does not


def model_kind(model: nn.Module | None) -> str:
    """``"transformer"`` for a model with token embeddings or attention (an ``nn.Embedding``, an
    ``nn.MultiheadAttention``, or a module whose class is named ``…Attention``, as Hugging Face's
    are); ``"large_cnn"`` for one with convolutions and at least :data:`LARGE_CNN_PARAMETERS`
    parameters; else ``"default"`` (also without a model: a parameter list says nothing of its model)."""
    if model is None:
        return DEFAULT
    modules = list(model.modules())
    if any(isinstance(m, (nn.Embedding, nn.MultiheadAttention)) or "Attention" in type(m).__name__ for m in modules):
        return TRANSFORMER
    convolutional = any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in modules)
    if convolutional and sum(p.numel() for p in model.parameters()) >= LARGE_CNN_PARAMETERS:
        return LARGE_CNN
    return DEFAULT


def recommended_lr(expr: str | Expr, namespace: Namespace | None = None, kind: str = DEFAULT) -> float:
    """The recommended learning rate of ``expr`` on a model of ``kind`` (see the module's
    docstring), else 1e-3; ``namespace``: the presets by default."""
    namespace = presets() if namespace is None else namespace
    try:
        tree = parse(expr) if isinstance(expr, str) else expr
    except OpcompError:
        return DEFAULT_LR  # the optimizer reports the mistake where it lowers the expression
    lr = _scale_setter(tree, namespace, kind)
    return DEFAULT_LR if lr is None else lr


def _scale_setter(tree: Expr, namespace: Namespace, kind: str) -> float | None:
    if isinstance(tree, (Name, Call)):
        arguments = tree.args if isinstance(tree, Call) else ()
        if tree.name in namespace and not arguments:
            return namespace.note(tree.name).lr_for(kind)
        spec = REGISTRY.get(tree.name)
        if spec is None:
            return None
        if spec.scale_of is not None and arguments:
            return _scale_setter(arguments[spec.scale_of], namespace, kind)
        spec = REGISTRY["g"] if spec.scale_of is not None else spec  # `sam` alone steps along the gradient
        return spec.kind_lrs.get(kind, spec.lr)
    if isinstance(tree, Fallback):
        return _scale_setter(tree.branches[0], namespace, kind)
    if isinstance(tree, Neg):
        return _scale_setter(tree.operand, namespace, kind)
    if isinstance(tree, Product):
        updates = [f for f in tree.factors if not isinstance(f, Num)]
        return _scale_setter(updates[0], namespace, kind) if len(updates) == 1 else None
    return None
