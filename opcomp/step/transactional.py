"""The transactional route: a step with layer statistics or probes, kept whole or not at all.

Every family computes its update before anything is decided: layer statistics and probes hand
theirs back (:func:`~opcomp.step.interpreter.run_family`), element-wise families step in place
from a copy to go back to (:class:`~opcomp.state.Undo`), and the step is kept only when the
gradients, the updates and what they wrote are all finite (:class:`~opcomp.finite.Checks`).
Buckets on torch's fused AdamW step once the step is decided: nothing to copy. A step without
probes records its checks on the device and decides them once, at its end (one read per step);
probes decide each evaluation as it comes. On CUDA a step that created no state is kept or
undone on the device (:func:`device_decision`), with no read at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from opcomp.finite import Checks, NonFinite, all_finite
from opcomp.layers.statistics import StepStatistics
from opcomp.state import keep_where, snapshot, unchanged_layout
from opcomp.step.eager import run_eagerly
from opcomp.step.fused import step_adamw
from opcomp.step.interpreter import run_family
from opcomp.step.routes import Parts
from opcomp.step.update import Update, land, landing, written


def decides_on_device(params: list[Tensor]) -> bool:
    """Whether a step with layer statistics keeps or undoes itself on the device instead of reading
    its checks (docs/runtime.md): on CUDA, where a read stalls the queue of launched work. On the
    CPU a read costs nothing, and the masked writes would cost passes over the changed state."""
    return any(p.is_cuda for p in params)


@dataclass
class Computed:
    """A step's work before it is decided: the updates handed back and where they would land."""

    updates: list[Update]
    landings: list[list[Tensor]]
    ok: Tensor | None  # the device's decision, or None when the host decided (the step is kept)


def step(run, parts: Parts, grads: list[Tensor], stepper) -> None:
    """One step through this route. ``run`` is the step's :class:`~opcomp.step.runner.Run`; a step
    given up puts back its state (``run.state``, which the optimizer keeps)."""
    deferring = bool(parts.transactional) and not run.probing
    if grads and not deferring and not all_finite(grads):
        stepper.skipped(run)
        return
    touched = [p for items in parts.transactional.values() for _, _, params in items for p in params]
    stepped = [item for items in parts.in_place.values() for item in items]
    replaced = stepper.routes.replaced
    in_place = [p for _, _, params in stepped for p in params]
    saved = snapshot(run.state, touched, replaced, in_place) if touched or in_place else None
    kept = stepper.undo.keep(written(stepped, run.state))
    try:
        computed = compute(run, parts, grads, stepper, Checks(deferred=deferring), saved, touched)
    except BaseException as error:  # inf or NaN, or a closure or kernel that raised: nothing is kept
        stepper.undo.restore(kept)
        if saved is not None:
            run.state = saved
        if isinstance(error, NonFinite):
            stepper.skipped(run)
            return
        if run.capture is not None:
            run.capture.clear()
        raise
    ok = computed.ok
    for update, new in zip(computed.updates, computed.landings):
        land(update, new, ok)
    if parts.fused:
        step_adamw(parts.fused, run.state, parts.nodes, None if ok is None else (~ok).to(torch.float32))
    if ok is not None:  # the step is kept, or undone, where ok says
        keep_where(ok, run.state, saved, touched, replaced)
        stepper.skips.counter(ok).add_((~ok).to(torch.int32))
        stepper.skips.after_device_step(stacklevel=7)


def compute(run, parts: Parts, grads, stepper, checks: Checks, saved, touched: list[Tensor]) -> Computed:
    """Every family's work, checked; NonFinite when the host decides that some check failed."""
    capture = run.capture
    statistics = StepStatistics(capture, run.reduction, run.parallel) if capture is not None else None
    if checks.deferred and grads:
        checks(grads)
    updates = [
        update
        for expression, items in parts.transactional.items()
        for update in run_family(run.plan, expression, items, run.state, statistics, run.probe, run.parallel, checks)
    ]
    landings = [landing(update) for update in updates]
    checks([v for update, new in zip(updates, landings) for v in (*update.direction, *new)])
    for expression, items in parts.in_place.items():
        run_eagerly(run.plan.graphs[expression], items, run.state, run.parallel)
        stepper.compiled.stepped_eagerly(expression, items)
    checks(written([item for items in parts.in_place.values() for item in items], run.state))
    ok = device_decision(checks, run.state, saved, touched) if checks.deferred and not parts.in_place else None
    if ok is None and not checks.decided():
        raise NonFinite
    return Computed(updates, landings, ok)


def device_decision(checks: Checks, state, saved, touched: list[Tensor]) -> Tensor | None:
    """The step's checks as one device flag, when the step can be kept or undone where it holds
    without the host reading it: on CUDA (:func:`decides_on_device`), for a step that created no
    state (a first step, a first refresh: then the host reads, as on the CPU) and that steps no
    element-wise family in place beside its layer statistics (those run after the host decided)."""
    if not touched or not decides_on_device(touched) or not unchanged_layout(state, saved, touched):
        return None
    return checks.together(touched[0])
