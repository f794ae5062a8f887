"""opcomp.Optimizer: a torch.optim.Optimizer whose step runs an expression's graph per bucket.

The optimizer keeps torch.optim's contract (param groups, ``step``, ``zero_grad``, state dicts,
schedulers), builds the :class:`~opcomp.plan.Plan` with its groups, and hands each step — after
the closure's first evaluation (:mod:`opcomp.closure`) — to the routes of :mod:`opcomp.step`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Literal

import torch
from torch import Tensor

import opcomp.checkpoint as checkpoint
import opcomp.distributed as distributed
from opcomp.capture import Capture, Likelihood
from opcomp.checkpoint import check_lr, warn_dropped
from opcomp.closure import CLOSURE_SHAPE, Probe, first_evaluation
from opcomp.definitions import Namespace
from opcomp.errors import OpcompError, OpcompTypeError, OpcompValueError, OpcompWarning, warn
from opcomp.head import HeadWatch, candidates
from opcomp.kernels import load as load_kernels
from opcomp.lang.ast import Expr
from opcomp.layers.statistics import Reduction
from opcomp.ops import Applies
from opcomp.plan import Plan, new_params
from opcomp.prediction import Output, Prediction
from opcomp.report import warn_at_build
from opcomp.settings import check_settings
from opcomp.state import snapshot
from opcomp.step.runner import Run, Stepper


class Optimizer(torch.optim.Optimizer):
    """An optimizer compiled from an expression; build one with :func:`opcomp.build`.

    Each param group carries its expression under ``"expr"`` (canonical text) and its ``"lr"``;
    the step is ``p ← p − lr·u`` with ``u`` the expression's value for the parameter. State is
    kept per parameter and keyed by each stateful node's canonical text, so it survives
    rebuilding the optimizer with an expression that shares the sub-expression.
    """

    def __init__(
        self,
        params,
        expr: str | Expr = "adamw",
        lr: float = 1e-3,
        *,
        namespace: Namespace | None = None,
        model: torch.nn.Module | None = None,
        names: Mapping[int, str] | None = None,
        owners: Mapping[int, tuple[torch.nn.Module, str]] | None = None,
        reduction: Reduction = "mean",
        likelihood: Likelihood | None = None,
        class_dim: int | None = None,
        output: Output = "logits",
        compile: Literal["auto", "on", "off"] = "auto",  # noqa: A002 - the option's documented name
        data_parallel: distributed.Setting = "auto",
    ) -> None:
        check_lr(lr, "the optimizer")
        self._class_dim = check_settings(compile, reduction, likelihood, class_dim)
        self._prediction = Prediction(output)
        model, self._parallel = distributed.resolve(model, data_parallel)
        load_kernels()  # registers every kernel family
        self._plan = Plan(namespace, model, names, owners, sampling=likelihood is not None)
        self._stepper = Stepper(compile)
        self._reduction, self._likelihood = reduction, likelihood
        self._capture: Capture | None = None
        default = self._plan.lower(expr)
        self._default = (expr if isinstance(expr, str) else default.canonical, default)
        super().__init__(params, {"lr": lr, "expr": default.canonical})
        nodes = [n for group in self.param_groups for n in self._plan.graphs[group["expr"]].nodes]
        distributed.check(
            [p for group in self.param_groups for p in group["params"]],
            self._parallel,
            data_parallel,
            statistics=self._capture is not None,
            nodes=nodes,
        )
        warn_at_build(self._plan, self.param_groups)
        self._loaded: tuple[dict, Counter] | None = None  # a load before the head was settled
        self._head_watch = self._watch_head()

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, Mapping):
            raise OpcompTypeError(f"a param group is a dict with 'params', got {type(param_group).__name__}")
        group = dict(param_group)
        if "params" not in group:
            raise OpcompValueError(f"param group {len(self.param_groups)} has no 'params': {{'params': [...], ...}}")
        group["params"] = new_params(group["params"], self.param_groups, self._plan.names)
        if "lr" in group:
            check_lr(group["lr"], f"param group {len(self.param_groups)}")
        if "expr" in group:
            graph = self._plan.lower(group["expr"])
            written = group["expr"] if isinstance(group["expr"], str) else graph.canonical
        else:
            written, graph = self._default
        group["expr"] = graph.canonical
        self._plan.add_group(graph, group["params"], written)
        super().add_param_group(group)
        if self._capture is not None:
            self._capture.close()
        self._capture = None
        self._planned()

    def _planned(self, records: dict | None = None) -> None:
        """After the plan changed: capture what its layers need (``records``: what the capture
        recorded already, kept), decide the routes, arm the capture."""
        expressions = [g["expr"] for g in self.param_groups]
        modules = self._plan.plan_layers(expressions)
        if self._capture is not None and (not modules or records is None):
            self._capture.close()
            self._capture = None
        if modules and self._capture is None:
            model = self._plan.model
            self._capture = Capture(
                model, modules, self._likelihood, self._class_dim, self._reduction, self._prediction
            )
        if modules and records is not None:
            self._capture.retarget(modules, records)
        if modules:
            self._capture.summed = self._plan.summed_at_capture()
        self._stepper.plan(self._plan, expressions)
        self._arm()

    # -- the output head, settled by the model's first forward (opcomp.head) -----------------------

    def _watch_head(self) -> HeadWatch | None:
        """Watch the first forward when some expression tells hidden layers from the head."""
        model = self._plan.model
        nodes = [n for group in self.param_groups for n in self._plan.graphs[group["expr"]].nodes]
        layers = candidates(model, self._plan.hidden_from_hooks) if model is not None else []
        if len(layers) < 2 or not any(n.applies is Applies.HIDDEN for n in nodes):
            return None
        return HeadWatch(model, layers, self._prediction, self._head_seen)

    def _head_seen(self, head: torch.nn.Module, records: dict) -> None:
        """The first forward named the head: plan again if it is not the guessed one."""
        self._head_watch, loaded, self._loaded = None, self._loaded, None
        if id(head) == self._plan.head:
            if loaded is not None:
                warn_dropped(loaded[1])
            return
        if any(self.state.values()) and loaded is None:
            warn(
                f"opcomp: the model's output head is '{type(head).__name__}' layer "
                f"{self._plan.names.get(id(head.weight), '?')}, not the layer the build assumed, but the optimizer "
                "has stepped already: its plan stays (build before the first step, or say which layer "
                "runs what in a rule file)",
                OpcompWarning,
            )
            return
        self._plan = self._plan.with_head(head, self.param_groups)
        self._planned(records)
        if loaded is not None:
            self.load_state_dict(loaded[0])

    def _arm(self) -> None:
        """Record layer statistics only for a step where some node's statistics are due."""
        if self._capture is not None:
            self._capture.armed, self._capture.sample = self._plan.arming(self.state)

    # -- the step ---------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step; returns the loss when given a closure.

        Expressions with probes need ``opt.step(closure)`` with a closure that returns the loss and
        calls no backward (see :mod:`opcomp.closure`); others accept that closure too, a torch-style
        closure that calls backward itself, or none after ``loss.backward()``.
        """
        graphs = [self._plan.graphs[group["expr"]] for group in self.param_groups]
        probing = self._probes()
        if closure is None and probing:
            raise OpcompError(
                f"'{probing[0].op}' evaluates the loss again during the step: call opt.step(closure) "
                f"with {CLOSURE_SHAPE}"
            )
        loss, probe = None, None
        if closure is not None:
            params = [p for group in self.param_groups for p in group["params"]]
            disarm = self._capture.disarmed if self._capture is not None else nullcontext
            try:
                loss, probe = first_evaluation(
                    closure, params, graphs, self._plan.model, disarm, bool(probing), self._prediction, self._parallel
                )
            except BaseException:  # nothing of this step is kept, the statistics its forward recorded neither
                if self._capture is not None:
                    self._capture.clear()
                raise
        loss = self._step(loss, probe)
        return probe.estimate() if loss is None and probe is not None else loss

    @property
    def data_parallel(self) -> distributed.DataParallel | None:
        """The group over which opcomp reduces what it computes itself, with a tally of the bytes it
        all-reduced and how its decompositions split; None in one process (docs/distributed.md)."""
        return self._parallel

    @property
    def needs_closure(self) -> bool:
        """Whether a step evaluates the loss again (probes): then it takes ``opt.step(closure)``."""
        return bool(self._probes())

    def _probes(self) -> list:
        graphs = [self._plan.graphs[group["expr"]] for group in self.param_groups]
        return [n for graph in graphs for n in graph.nodes if n.spec.needs.closure]

    def _step(self, loss: Tensor | None, probe: Probe | None) -> Tensor | None:
        capture = self._capture
        probing = bool(self._probes())
        run = Run(self._plan, self.param_groups, self.state, capture, self._reduction, self._parallel, probe, probing)
        try:
            stepped = self._stepper.step(run)
        finally:
            self.state = run.state
        if stepped and capture is not None:
            capture.clear()
            self._arm()
        return loss

    @torch.no_grad()
    def warm_up(self) -> bool:
        """Compile the fused step now rather than in the first steps; True if there was one to compile.

        Runs the first two steps on zero gradients and a scratch state, then puts everything back
        (:meth:`opcomp.step.runner.Stepper.warm_up`): the optimizer then steps exactly as if it had
        not warmed up, and its second step finds its graph compiled.
        """
        state = self.state
        try:
            self.state = snapshot(state, [p for group in self.param_groups for p in group["params"]])
            return self._stepper.warm_up(self._plan, self.param_groups, lambda: self._step(None, None))
        finally:
            self.state = state

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient, a probe or the step held inf or NaN (reads the device)."""
        return self._stepper.skips.count

    # -- state ------------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        """Load state saved by an opcomp optimizer over the same parameters (groups in order).

        State is matched by each node's canonical key (an optimizer rebuilt with another expression
        takes over the state of every sub-expression the two share; the rest is dropped, with a
        warning that names it), checked whole before anything is kept (:mod:`opcomp.checkpoint`).
        The groups keep their expressions; every other group setting (lr, …) is restored.
        """
        settings, state, dropped = checkpoint.read(self._plan, self.param_groups, state_dict)
        for saved, group in zip(settings, self.param_groups):
            group.update(saved)
        self.state = state
        if self._head_watch is not None:  # the plan may change at the first forward: load again then
            self._loaded = (state_dict, dropped)
        else:
            warn_dropped(dropped)
        self._arm()

    def close(self) -> None:
        """Remove this optimizer's hooks from the model now (they also go when it is collected).

        Stepping a layer expression afterwards fails: its statistics are no longer captured.
        """
        if self._capture is not None:
            self._capture.close()

    # -- people -----------------------------------------------------------------------------------

    def assignments(self) -> dict[str, str]:
        """Parameter name -> the operators it runs, outermost first (``'muon ← kfac'``)."""
        return self._plan.assignments()

    def rules(self) -> dict[str, str]:
        """Parameter name -> the rule of the rule file that chose its expression ('rule 2', 'default')."""
        return self._plan.rules(self.param_groups)

    def explain(self) -> str:
        """Each group's graph and what every parameter runs."""
        return self._plan.describe(self.param_groups)
