"""What a probe's evaluation of the closure leaves as it was, beyond parameters and buffers.

A closure may do more than compute the loss. Lightning's ``training_step`` logs (``self.log``)
and updates torchmetrics metrics, and Lightning's closure keeps what ``training_step`` returned
for the loop (``on_train_batch_end``'s outputs, the progress bar's loss). The step's training
pass does all of that once; a probe that evaluates the closure again at a shifted point (SAM's
p + ε, every zeroth-order probe after the first) runs ``training_step`` too, and without this its
values, at the shifted point, would overwrite the training pass's and its metric updates would
count twice. Found by duck typing (class names), so neither library is imported here.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

METRIC_COUNTERS = ("_update_count", "_computed", "_forward_cache")
"""torchmetrics' bookkeeping besides the states ``add_state`` declares (``Metric._defaults``)."""


@contextmanager
def quiet(model: nn.Module | None, closure) -> Iterator[None]:
    """Meanwhile a LightningModule's ``log`` and ``log_dict`` do nothing; afterwards every torchmetrics
    metric of ``model`` and the result a Lightning closure kept are as they were before."""
    modules = list(model.modules()) if model is not None else []
    lightning = [m for m in modules if _is(m, "LightningModule")]
    metrics = [
        (m, _metric_state(m)) for m in modules if _is(m, "Metric") and isinstance(getattr(m, "_defaults", None), dict)
    ]
    results = [(c, c._result) for c in _lightning_closures(closure)]
    for module in lightning:
        object.__setattr__(module, "log", _ignore)
        object.__setattr__(module, "log_dict", _ignore)
    try:
        yield
    finally:
        for module in lightning:
            vars(module).pop("log", None)
            vars(module).pop("log_dict", None)
        for metric, state in metrics:
            for name, value in state.items():
                object.__setattr__(metric, name, value)
        for kept, result in results:
            kept._result = result


def _ignore(*args, **kwargs) -> None:
    return None


def _is(thing, class_name: str) -> bool:
    return any(cls.__name__ == class_name for cls in type(thing).__mro__)


def _metric_state(metric: nn.Module) -> dict:
    names = [*metric._defaults, *(n for n in METRIC_COUNTERS if hasattr(metric, n))]
    return {name: _copied(getattr(metric, name)) for name in names}


def _copied(value):
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [_copied(v) for v in value]
    return value


def _lightning_closures(closure, depth: int = 0) -> Iterator:
    """Lightning's ``Closure`` objects inside ``closure`` (its precision plugin wraps it in partials)."""
    if depth > 4:
        return
    if hasattr(closure, "_result") and _is(closure, "AbstractClosure"):
        yield closure
    if isinstance(closure, functools.partial):
        for inner in (closure.func, *closure.args, *closure.keywords.values()):
            yield from _lightning_closures(inner, depth + 1)
