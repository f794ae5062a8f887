"""What an entry of a comparison names: an opcomp expression, or any torch.optim.Optimizer class.

An opcomp entry is a preset, an expression or a rule file; it steps through ``opt.step(closure)``
and its recommended lr is opcomp's. A **class entry** is written as the class's import path,
``torch.optim.AdamW``, ``heavyball.SOAP``, or ``module:Class`` for a module in the current
directory (``my_optimizers:Lion``), with keyword arguments in brackets as Python literals:
``heavyball.SOAP[precondition_frequency=10, betas=(0.9, 0.95)]``. It is built over the model's
parameters with those arguments, steps as torch.optim documents it (zero_grad, backward, step),
and takes the comparison's lr through its param groups' ``"lr"``, as an LR scheduler sets it: its
recommended lr is the lr the class sets itself (its default, or the ``lr=`` given). From Python,
:func:`opcomp.compare` also takes ``(name, factory)`` with ``factory(params) -> Optimizer``.
"""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from opcomp.errors import OpcompError
from opcomp.files import call, load_callable
from opcomp.rules import is_rule_file

CLASS_PATH = re.compile(
    r"^(?P<path>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+|[A-Za-z_][\w.]*:[A-Za-z_]\w*)(?:\[(?P<arguments>.*)\])?$", re.S
)
"""A dotted import path of two or more names (``torch.optim.AdamW``) or ``module:Class``, with
optional ``[keyword=literal, …]``: no opcomp expression looks like that (their names have no dots)."""

Factory = Callable[[list], torch.optim.Optimizer]


@dataclass(frozen=True)
class Entry:
    """One optimizer of a comparison: an opcomp expression (``factory`` None) or an optimizer
    built by ``factory(params)``."""

    name: str
    factory: Factory | None = None

    @property
    def is_opcomp(self) -> bool:
        return self.factory is None

    def build(self, model: nn.Module, lr: float | None) -> torch.optim.Optimizer:
        """The entry's optimizer over ``model``'s parameters, every group at ``lr`` (None: its own)."""
        opt = call(self.name, "compare", self.factory, list(model.parameters()))
        if not isinstance(opt, torch.optim.Optimizer):
            raise OpcompError(f"compare: {self.name} made a {type(opt).__name__}, not a torch.optim.Optimizer")
        if lr is not None:
            for group in opt.param_groups:
                group["lr"] = lr
        return opt

    def own_lr(self, model: nn.Module) -> float:
        """The lr the optimizer sets itself (its first group's): what it recommends."""
        lr = self.build(model, None).param_groups[0].get("lr")
        if isinstance(lr, torch.Tensor):
            lr = float(lr)
        if not isinstance(lr, (int, float)) or isinstance(lr, bool):
            raise OpcompError(f"compare: {self.name} sets no numeric 'lr' in its param groups; give one: [lr=...]")
        return float(lr)


def entry(spec) -> Entry:
    """The entry ``spec`` names: an :class:`Entry`, a ``(name, factory)`` pair, a class path with
    optional arguments, or (anything else) an opcomp expression."""
    if isinstance(spec, Entry):
        return spec
    if isinstance(spec, tuple):
        if len(spec) != 2 or not isinstance(spec[0], str) or not callable(spec[1]):
            raise OpcompError(f"compare: {spec!r} is not (name, factory): factory(params) must make an Optimizer")
        return Entry(spec[0], spec[1])
    if not isinstance(spec, str):
        raise OpcompError(f"compare: {spec!r} is not an optimizer: give an expression, a class path or (name, factory)")
    found = CLASS_PATH.match(spec.strip())
    if found is None or is_rule_file(spec):  # adaptive.toml is a rule file, not a class path
        return Entry(spec)
    cls = optimizer_class(found["path"], spec)
    arguments = keyword_arguments(found["arguments"] or "", spec)
    return Entry(spec.strip(), lambda params: cls(params, **arguments))


def optimizer_class(path: str, spec: str) -> type:
    """The class at ``path`` (``a.b.C`` or ``module:C``), checked to be a torch.optim.Optimizer."""
    module, _, name = path.rpartition(".") if ":" not in path else path.partition(":")
    found = load_callable(f"{module}:{name}", f"compare entry {spec!r}", check_arguments=False)
    if not (inspect.isclass(found) and issubclass(found, torch.optim.Optimizer)):
        raise OpcompError(f"compare: {spec} is not a torch.optim.Optimizer class ({type(found).__name__})")
    return found


def keyword_arguments(text: str, spec: str) -> dict:
    """``a=1, betas=(0.9, 0.95)`` as a dict of Python literals; an error naming the entry otherwise."""
    if not text.strip():
        return {}
    try:
        parsed = ast.parse(f"f({text})", mode="eval").body
        if not isinstance(parsed, ast.Call) or parsed.args or any(k.arg is None for k in parsed.keywords):
            raise ValueError
        return {k.arg: ast.literal_eval(k.value) for k in parsed.keywords}
    except (SyntaxError, ValueError):
        raise OpcompError(
            f"compare: {spec}: the arguments in brackets must be keyword=literal pairs, e.g. "
            "heavyball.SOAP[precondition_frequency=10, betas=(0.9, 0.95)]"
        ) from None
