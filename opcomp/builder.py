"""``opcomp.build``: an expression or preset plus a model (or parameters) -> an optimizer."""

from __future__ import annotations

from torch import Tensor, nn

from opcomp.capture import Likelihood
from opcomp.definitions import Namespace
from opcomp.errors import OpcompError
from opcomp.kernels.factors import Reduction
from opcomp.lang.ast import Call, Expr, Name, Option
from opcomp.lang.parser import parse
from opcomp.optimizer import Optimizer
from opcomp.resolve import option_expr


def build(
    expr: str | Expr,
    model_or_params,
    lr: float = 1e-3,
    *,
    model: nn.Module | None = None,
    namespace: Namespace | None = None,
    reduction: Reduction = "mean",
    likelihood: Likelihood | None = None,
    **options,
) -> Optimizer:
    """The optimizer for ``expr`` over a model or parameters.

    ``model_or_params`` is an ``nn.Module`` (its trainable parameters, named), an iterable of
    tensors, of ``(name, tensor)`` pairs, or of param-group dicts; a group may carry its own
    ``"expr"`` and ``"lr"``. Pass ``model=`` with groups when operators need the model's layers.
    Keyword ``options`` set options of a bare operator or preset:
    ``build("adamw", params, lr=1e-3, wd=0.1)`` is ``build("adamw[wd=0.1]", params, lr=1e-3)``.

    Layer statistics (the KFAC family) are per example: ``reduction`` says how the loss combines
    examples ("mean", torch's default, or "sum"), so captured output gradients can be rescaled.
    ``likelihood`` ("categorical" for logits, "gaussian" for ½‖f − y‖²) lets ``fisher=mc`` sample
    labels from the model's output.
    """
    if isinstance(model_or_params, nn.Module):
        model = model_or_params
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = list(model_or_params) if not isinstance(model_or_params, Tensor) else [model_or_params]
    if not params:
        raise OpcompError("there are no parameters to optimize (are they all frozen, requires_grad=False?)")
    names: dict[int, str] = {}
    if model is not None:
        names = {id(p): n for n, p in model.named_parameters()}
    if all(isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) for item in params):
        names.update({id(p): n for n, p in params})
        params = [p for _, p in params]
    owners = {}
    if model is not None:
        owners = {id(p): (m, role) for m in model.modules() for role, p in m.named_parameters(recurse=False)}
    return Optimizer(
        params,
        with_options(expr, options),
        lr,
        namespace=namespace,
        model=model,
        names=names,
        owners=owners,
        reduction=reduction,
        likelihood=likelihood,
    )


def with_options(expr: str | Expr, options: dict) -> str | Expr:
    """``expr`` with keyword options added to its bare operator or preset name."""
    if not options:
        return expr
    tree = parse(expr) if isinstance(expr, str) else expr
    if isinstance(tree, Name):
        tree = Call(tree.name, _options(options), (), tree.span)
    elif isinstance(tree, Call) and not tree.args:
        tree = Call(tree.name, tree.options + _options(options), (), tree.span)
    else:
        raise OpcompError(
            f"keyword options ({', '.join(options)}) need a bare operator or preset name such as 'adamw'; "
            "write them in brackets inside the expression instead"
        )
    return tree


def _options(options: dict) -> tuple[Option, ...]:
    out = []
    for key, value in options.items():
        if not isinstance(value, (bool, int, float, str)):
            raise OpcompError(f"keyword option {key}={value!r}: options are numbers, booleans or words")
        out.append(Option(key, option_expr(value)))
    return tuple(out)
