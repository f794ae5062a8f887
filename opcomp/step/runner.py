"""A step: the plan's families sorted by route, each route run, the step kept or skipped whole.

When every family steps in place and every compiled one has started, the step is decided on the
device (:meth:`Stepper.on_device`: compiled steps check themselves, torch's fused AdamW reads a
device flag) and reads nothing back; otherwise it goes through the transactional route, which
runs the in-place families eagerly beside the ones that hand their updates back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from opcomp.capture import Capture
from opcomp.closure import Probe
from opcomp.distributed import DataParallel
from opcomp.errors import OpcompError
from opcomp.finite import all_finite, non_finite
from opcomp.plan import Plan
from opcomp.skips import Skips
from opcomp.state import Undo
from opcomp.step import transactional
from opcomp.step.compiled import Compiled
from opcomp.step.eager import run_eagerly
from opcomp.step.fused import step_adamw
from opcomp.step.routes import Parts, Routes


@dataclass
class Run:
    """What one step works on."""

    plan: Plan
    groups: list[dict]
    state: Mapping
    capture: Capture | None
    reduction: str
    parallel: DataParallel | None
    probe: Probe | None
    probing: bool  # some node evaluates the loss again: its checks decide as they come


class Stepper:
    """The optimizer's routes (decided by :meth:`plan`), its compiled steps, its copies to undo
    in-place writes, and its count of skipped steps."""

    def __init__(self, compile: str) -> None:  # noqa: A002 - the option's documented name
        self.compiled = Compiled(compile)
        self.undo = Undo()
        self.skips = Skips()
        self.routes = Routes({}, set())

    def plan(self, plan: Plan, expressions: list[str]) -> None:
        """Decide every bucket's route: at build, and whenever the plan changes (compiled steps of
        the plan before are dropped: their buckets are gone)."""
        self.routes = Routes.of(plan, expressions)
        self.compiled = Compiled(self.compiled.compile)

    def step(self, run: Run) -> bool:
        """One step; False when nothing was to step. A step given up leaves in ``run.state`` the
        state to keep."""
        families = run.plan.families(run.groups)
        if not families:
            return False
        grads = [p.grad for items in families.values() for _, _, params in items for p in params if p.grad is not None]
        if any(g.is_sparse for g in grads):
            raise OpcompError("sparse gradients are not supported; use nn.Embedding(sparse=False)")
        parts = self.routes.split(families)
        on_device = not parts.transactional and all(self.compiled.ready(e, i) for e, i in parts.in_place.items())
        if grads and on_device:
            self.on_device(run, parts, grads)
        else:
            transactional.step(run, parts, grads, self)
        return True

    def on_device(self, run: Run, parts: Parts, grads: list[Tensor]) -> None:
        """Element-wise families whose compiled steps check finiteness themselves, and the fused
        buckets told by their flag: no value is read back from the device (a skip is counted
        there, see :mod:`opcomp.skips`)."""
        ok = None
        for expression, items in parts.in_place.items():
            graph = run.plan.graphs[expression]
            flag = self.compiled.run(expression, graph, items, run.state, grads if ok is None else [], self.skips, ok)
            if flag is not None:
                ok = flag
                continue
            # the compiler failed here: this family steps eagerly, decided on the host
            if ok is None and not all_finite(grads):
                self.skipped(run)
                return
            if ok is not None and not bool(ok):
                break
            run_eagerly(graph, items, run.state, run.parallel)
        if parts.fused:
            found = None
            if ok is None:
                found = non_finite(grads)
                self.skips.counter(grads[0]).add_(found.to(torch.int32))
                ok = found == 0
            step_adamw(parts.fused, run.state, parts.nodes, (~ok).to(torch.float32) if found is None else found)
        if ok is not None:
            self.skips.after_device_step(stacklevel=7)

    def warm_up(self, plan: Plan, groups: list[dict], step: Callable[[], None]) -> bool:
        """Two ``step``s on zero gradients when every family compiles (the eager one that makes the
        state, and the one that compiles), then the parameters, their gradients, the skip count and
        which families started put back; False (nothing run) when some family does not compile."""
        params = [p for group in groups for p in group["params"]]
        grads, values = [p.grad for p in params], None
        compiled, skips, started = self.compiled, self.skips, set(self.compiled.started)
        try:
            for param in params:
                param.grad = torch.zeros_like(param)
            families = plan.families(groups)
            parts = self.routes.split(families)
            if not families or parts.in_place.keys() != families.keys():
                return False
            if not all(compiled.compiles(items) for items in parts.in_place.values()):
                return False
            values = [p.detach().clone() for p in params]
            self.skips = Skips()
            for _ in range(2):
                step()
        finally:
            for position, (param, grad) in enumerate(zip(params, grads)):
                if values is not None:
                    param.copy_(values[position])
                param.grad = grad
            self.skips, compiled.started = skips, started
        return True

    def skipped(self, run: Run) -> None:
        if run.capture is not None:
            run.capture.clear()
        self.skips.skipped(stacklevel=8)
