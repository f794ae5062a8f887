"""``opcomp.build``: an expression or preset plus a model (or parameters) -> an optimizer."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Literal

from torch import Tensor, nn

import opcomp.distributed as distributed
from opcomp.capture import Likelihood
from opcomp.definitions import Namespace, presets
from opcomp.errors import OpcompError, OpcompNotice, OpcompTypeError
from opcomp.graph import build_graph
from opcomp.lang.ast import Call, Expr, Name, Option
from opcomp.lang.parser import parse
from opcomp.layers.statistics import Reduction
from opcomp.learning_rates import DEFAULT_LR, model_kind, recommended_lr
from opcomp.optimizer import Optimizer
from opcomp.prediction import Output
from opcomp.resolve import canonicalize, option_expr
from opcomp.rules import Rules, is_rule_file
from opcomp.rules import load as load_rules


def build(
    expr: str | Expr,
    model_or_params,
    lr: float | None = None,
    *,
    model: nn.Module | None = None,
    namespace: Namespace | None = None,
    reduction: Reduction = "mean",
    likelihood: Likelihood | None = None,
    class_dim: int | None = None,
    output: Output = "logits",
    compile: Literal["auto", "on", "off"] = "auto",  # noqa: A002 - the option's documented name
    data_parallel: distributed.Setting = "auto",
    warmup: bool = False,
    **options,
) -> Optimizer:
    """The optimizer for ``expr`` (an expression, a preset, or a ``.toml`` rule file) over a model.

    ``lr`` defaults to the recommended learning rate of the preset or of the operator that sets the
    update's scale (``opcomp presets``; :mod:`opcomp.learning_rates`), else 1e-3.
    ``model_or_params`` is an ``nn.Module`` (its trainable parameters, named), an iterable of
    tensors, of ``(name, tensor)`` pairs, or of param-group dicts; a group may carry its own
    ``"expr"`` and ``"lr"``. Pass ``model=`` with groups when operators need the model's layers.
    Keyword ``options`` set options of a bare operator or preset:
    ``build("adamw", params, lr=1e-3, wd=0.1)`` is ``build("adamw[wd=0.1]", params, lr=1e-3)``.

    Layer statistics (the KFAC family) are per example: ``reduction`` says how the loss combines
    examples ("mean", torch's default, or "sum"), so captured output gradients can be rescaled.
    ``likelihood`` ("categorical" for logits, "gaussian" for ½‖f − y‖²) lets ``fisher=mc`` sample
    labels from the model's output, over ``class_dim``: by default dim 1 for logits, as
    ``F.cross_entropy`` reads (N, C, d1, …) — pass ``class_dim=-1`` for (N, T, C) language-model
    logits — and the last dim for a Gaussian. Other dims after the first are positions, which a mean
    reduction averages.

    ``output`` says where the prediction is when the model's forward returns more than a tensor
    (``fisher=mc`` samples from it, Gauss–Newton products differentiate at it): a key or attribute,
    "logits" by default as in Hugging Face's ``ModelOutput``, or a function of the return value.

    ``compile``: run element-wise expressions as one ``torch.compile``d step (fused kernels, the
    learning rate a 0-d tensor so schedules never recompile): "on", "off", or "auto" — on CUDA only:
    on the CPU a cold compile costs 5–40 s and pays back after 80–750 steps (docs/performance.md),
    so long CPU runs ask for "on". A step that compiles says so first (:class:`OpcompNotice`).
    ``warmup=True`` compiles here instead of in the second step, leaving parameters and state as
    they were (:meth:`Optimizer.warm_up`).

    ``data_parallel``: under ``DistributedDataParallel`` ("auto", given the wrapped model) opcomp
    reduces what it computes itself — layer statistics, its own backward passes, probes — over the
    wrapper's group, so every rank steps as one process on the global batch (docs/distributed.md).
    Pass the group when the model is wrapped elsewhere (Lightning, Trainer), or "local".
    """
    namespace = presets() if namespace is None else namespace
    if not isinstance(namespace, Namespace):
        raise OpcompTypeError(
            f"namespace is an opcomp Namespace, such as opcomp.parse_definitions(text); got {type(namespace).__name__}"
        )
    if (
        model_or_params is None
        or isinstance(model_or_params, (str, bytes, Mapping))
        or not (isinstance(model_or_params, (nn.Module, Tensor, Iterable)))
    ):
        raise OpcompTypeError(
            "opcomp.build takes a model (nn.Module), a tensor, or an iterable of tensors, of (name, tensor) pairs "
            f"or of param-group dicts; got {type(model_or_params).__name__}"
        )
    if isinstance(model_or_params, nn.Module):
        model = model_or_params
    model, parallel = distributed.resolve(model, data_parallel)  # names are the module's, not DDP's
    data_parallel = parallel if parallel is not None else data_parallel
    if isinstance(model_or_params, nn.Module):
        params = [p for p in model.parameters() if p.requires_grad]
    elif isinstance(model_or_params, (set, frozenset)):
        raise OpcompError(
            "the parameters are a set, whose order changes from run to run (and with it the state_dict): "
            "pass a list, or model.parameters()"
        )
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
    if is_rule_file(expr):
        if model is None or options:
            raise OpcompError(
                "a rule file matches parameters by name and module: build it with the model, "
                "opcomp.build('rules.toml', model), and put options in the file"
            )
        rules = load_rules(expr)
        params = rule_groups(rules, params, names, owners, lr, namespace, model_kind(model))
        expr = rules.file.default.use
    else:
        expr, lr = with_options(expr, options), recommended_lr(expr, namespace, model_kind(model)) if lr is None else lr
    if warmup and compile == "off":
        raise OpcompError("warmup=True compiles the step at build, and compile='off' never compiles: drop one")
    optimizer = Optimizer(
        params,
        expr,
        lr if lr is not None else DEFAULT_LR,
        namespace=namespace,
        model=model,
        names=names,
        owners=owners,
        reduction=reduction,
        likelihood=likelihood,
        class_dim=class_dim,
        output=output,
        compile=compile,
        data_parallel=data_parallel,
    )
    if warmup and not optimizer.warm_up():
        warnings.warn(
            "opcomp: warmup=True found nothing to compile: "
            + (
                "compile='auto' steps eagerly on the CPU (compile='on' compiles there)"
                if compile == "auto" and not any(p.is_cuda for g in optimizer.param_groups for p in g["params"])
                else "expressions with layer statistics, probes or rebound gradients step eagerly, "
                "and adam(g) or adamw(g) alone runs torch's fused AdamW kernel"
            ),
            OpcompNotice,
            stacklevel=2,
        )
    return optimizer


def rule_groups(rules: Rules, params, names, owners, lr, namespace: Namespace, kind: str) -> list[dict]:
    """One param group per rule that matched, in rule order; each ``use`` is checked up front."""
    choices = [(f"rule {i}", rule) for i, rule in enumerate(rules.file.rule, 1)] + [("default", rules.file.default)]
    checked: dict[tuple, Expr] = {}  # rules that say the same are read once: thousands of rules stay cheap
    expressions = {}
    for label, choice in choices:
        said = (choice.use, tuple(sorted(choice.options.items())))
        if said not in checked:
            checked[said] = _checked(rules, label, choice, namespace)
        expressions[label] = checked[said]
    groups: dict[str, dict] = {}
    for param in params:
        module = owners.get(id(param), (None, None))[0]
        assigned = rules.assign(names.get(id(param), ""), param, module)
        choice = assigned.choice
        base = recommended_lr(choice.use, namespace, kind) if lr is None else lr
        group = groups.setdefault(
            assigned.label,
            {"params": [], "expr": expressions[assigned.label], "lr": base * choice.lr_scale, "rule": assigned.label},
        )
        group["params"].append(param)
    order = [label for label, _ in choices]
    return [groups[label] for label in order if label in groups]


def _checked(rules: Rules, label: str, choice, namespace: Namespace):
    """The choice's expression with its options, lowered once to report mistakes at their place."""
    try:
        tree = parse(choice.use, f"{rules.path} ({label}, use)")
        if choice.options and not _bare(tree):
            raise OpcompError(
                "options apply to a bare operator or preset name, and 'use' is an expression — "
                "write them in brackets inside it"
            )
        expr = with_options(tree, choice.options)
        build_graph(canonicalize(expr, namespace))
    except OpcompError as error:
        # options from the table carry no source position; everything else was written in `use`
        field = "options" if choice.options and error.span is None else "use"
        raise OpcompError(f"{rules.where(label, field)}: {error.message}", error.span) from None
    return expr


def _bare(tree: Expr) -> bool:
    return isinstance(tree, Name) or (isinstance(tree, Call) and not tree.args)


def with_options(expr: str | Expr, options: dict) -> str | Expr:
    """``expr`` with keyword options added to its bare operator or preset name."""
    if not options:
        return expr
    tree = parse(expr) if isinstance(expr, str) else expr
    if _bare(tree):
        tree = Call(tree.name, getattr(tree, "options", ()) + _options(options), (), tree.span)
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
