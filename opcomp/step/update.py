"""What a step does to the parameters: p ← p·(1 − lr·decay) − lr·u, in place or out of place.

An :class:`Update` is one bucket's direction ``u`` with its learning rate and its program's peeled
decay. A route that may yet give the step up computes the parameters after the update out of place
(:func:`landing`), checks them, and only then lands them (:func:`land`); an element-wise route
applies its updates in place (:func:`apply`), keeping what it writes (:func:`written`) to put back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from opcomp.finite import NonFinite
from opcomp.kernels.context import BucketStep
from opcomp.plan import Program
from opcomp.precision import working_dtype


@dataclass
class Update:
    """p ← p·(1 − lr·decay) − lr·u for one bucket."""

    lr: float | Tensor
    program: Program
    bucket: BucketStep
    direction: list[Tensor]


def apply(update: Update) -> None:
    """p ← p·(1 − lr·decay) − lr·u, in the working precision: rounded once for half-precision
    parameters, in place for fp32 and fp64 ones.

    ``lr`` is a float when eager and a 0-d tensor when compiled (so schedules never recompile).
    """
    params = update.bucket.params
    low = params[0].dtype != working_dtype(params[0].dtype)
    target = landing(update) if low else _moved(update, params)
    if target is not params:
        land(update, target)


def landing(update: Update) -> list[Tensor]:
    """The parameters after the update, out of place in the working precision: what a step that
    may yet be undone checks before anything lands."""
    return _moved(update, torch._foreach_mul(update.bucket.working_params, 1.0))


def _moved(update: Update, target: list[Tensor]) -> list[Tensor]:
    lr, decay = update.lr, update.program.decay
    if not isinstance(lr, Tensor) and lr > torch.finfo(target[0].dtype).max:
        raise NonFinite  # lr·u overflows whatever u is: skipped, as any update past the largest float
    if decay:
        torch._foreach_mul_(target, 1.0 - lr * decay)
    if isinstance(lr, Tensor):
        torch._foreach_sub_(target, torch._foreach_mul(update.direction, lr))
    else:
        torch._foreach_add_(target, update.direction, alpha=-lr)
    return target


def land(update: Update, values: list[Tensor], ok: Tensor | None = None) -> None:
    """The parameters set to ``values`` (from :func:`landing`); with ``ok`` (a device flag), only
    where it holds."""
    for param, value in zip(update.bucket.params, values):
        param.copy_(value if ok is None else torch.where(ok, value, param))


def written(items: list, state: Mapping) -> list[Tensor]:
    """What an in-place step of ``items`` wrote: their parameters and their nodes' state buffers."""
    return [
        t for (_, bucket, _), step in zip(items, bucket_steps(items, state)) for t in changing(bucket.program, step)
    ]


def bucket_steps(items: list, state: Mapping) -> list[BucketStep]:
    """This step's buckets of a family: the participating parameters with their state dicts."""
    return [BucketStep(params, [state[p] for p in params]) for _, _, params in items]


def changing(program: Program, bucket: BucketStep) -> list[Tensor]:
    """What a step of ``program`` writes: the parameters and their nodes' state buffers."""
    keys = {s.node.state_key for s in program.steps}
    kept = [t for state in bucket.states for key, buffers in state.items() if key in keys for t in buffers.values()]
    return list(bucket.params) + kept
