"""opcomp.Optimizer: a torch.optim.Optimizer whose step runs an expression's graph per bucket.

The optimizer keeps torch.optim's contract (param groups, ``step``, ``zero_grad``, state dicts,
schedulers) and orchestrates a step: the closure's first evaluation (:mod:`opcomp.closure`), the
finiteness check, each family's program (:mod:`opcomp.execute`) over the :class:`~opcomp.plan.Plan`
built with the groups, and the state's snapshot for steps that may give up (:mod:`opcomp.state`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from typing import Literal

import torch
from torch import Tensor

import opcomp.checkpoint as checkpoint
import opcomp.distributed as distributed
from opcomp.capture import Capture, Likelihood
from opcomp.checkpoint import check_lr, warn_dropped
from opcomp.closure import (
    CLOSURE_SHAPE,
    NonFinite,
    Probe,
    all_finite,
    all_true,
    deferred_checks,
    finite,
    first_evaluation,
    together,
)
from opcomp.definitions import Namespace
from opcomp.errors import OpcompError, OpcompTypeError, OpcompValueError, OpcompWarning, warn
from opcomp.execute import Elementwise, land, landing, run_family, runs_in_place, step_adamw, torch_adamw, written
from opcomp.head import HeadWatch, candidates
from opcomp.kernels import COLLECTIVE
from opcomp.kernels import load as load_kernels
from opcomp.kernels.factors import Reduction, StepStatistics
from opcomp.lang.ast import Expr
from opcomp.ops import Applies
from opcomp.plan import Plan, check_parameter
from opcomp.prediction import Output, Prediction
from opcomp.report import warn_at_build
from opcomp.skips import Skips
from opcomp.state import Undo, keep_where, snapshot, unchanged_layout


def decides_on_device(params: list[Tensor]) -> bool:
    """Whether a step with layer statistics keeps or undoes itself on the device instead of reading
    its checks (docs/runtime.md): on CUDA, where a read stalls the queue of launched work. On the
    CPU a read costs nothing, and the masked writes would cost passes over the changed state."""
    return any(p.is_cuda for p in params)


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
        if compile not in ("auto", "on", "off"):
            raise OpcompError(f"compile must be 'auto', 'on' or 'off', got {compile!r}")
        if reduction not in ("mean", "sum"):
            raise OpcompError(f"reduction must be 'mean' or 'sum' (how the loss combines examples), got {reduction!r}")
        if likelihood not in (None, "categorical", "gaussian"):
            raise OpcompError(f"likelihood must be 'categorical' or 'gaussian', got {likelihood!r}")
        if class_dim is not None and (isinstance(class_dim, bool) or not isinstance(class_dim, int) or class_dim == 0):
            raise OpcompError(
                f"class_dim is a dimension of the model's output other than the batch's 0, got {class_dim!r}"
            )
        self._prediction = Prediction(output)
        model, self._parallel = distributed.resolve(model, data_parallel)
        load_kernels()  # registers every kernel family
        self._plan = Plan(namespace, model, names, owners, sampling=likelihood is not None)
        self._elementwise = Elementwise(compile)
        self._reduction, self._likelihood = reduction, likelihood
        # classes on dim 1, as F.cross_entropy reads (N, C, …); a Gaussian's features last
        self._class_dim = class_dim if class_dim is not None else (1 if likelihood == "categorical" else -1)
        self._capture: Capture | None = None
        self._skips = Skips()
        self._undo = Undo()  # what element-wise families write in place, kept to put back
        default = self._plan.lower(expr)
        self._default = (expr if isinstance(expr, str) else default.canonical, default)
        super().__init__(params, {"lr": lr, "expr": default.canonical})
        nodes = [n for group in self.param_groups for n in self._plan.graphs[group["expr"]].nodes]
        distributed.check(
            [p for group in self.param_groups for p in group["params"]],
            self._parallel,
            data_parallel,
            statistics=self._capture is not None,
            probes=bool(self._probes()),
            global_norm=any(COLLECTIVE.get(n.op) == "global" for n in nodes),
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
        group["params"] = self._new_params(group["params"])
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
        modules = self._plan.plan_layers([g["expr"] for g in self.param_groups])
        if self._capture is not None:
            self._capture.close()
        self._capture = None
        if modules:
            self._capture = self._capturing(modules)
        self._arm()

    def _new_params(self, params) -> list[Tensor]:
        """A group's parameters, checked as torch.optim checks them (before anything is planned)."""
        number = len(self.param_groups)
        if isinstance(params, Tensor):
            params = [params]
        elif isinstance(params, (set, frozenset)):
            raise OpcompTypeError(f"param group {number}'s 'params' is a set; pass a list so the order is fixed")
        elif isinstance(params, (str, bytes, Mapping)) or not isinstance(params, Iterable):
            raise OpcompTypeError(
                f"param group {number}'s 'params' is a {type(params).__name__}: give a list of tensors "
                "(model.parameters())"
            )
        params = list(params)
        seen = {id(p) for group in self.param_groups for p in group["params"]}
        for position, param in enumerate(params):
            name = self._plan.names.get(id(param), f"#{position} of param group {number}")
            check_parameter(param, name)
            if not param.is_leaf:
                raise OpcompValueError(
                    f"parameter {name} is not a leaf tensor (it was computed from others, and a step could not "
                    "change it): optimize the tensor it came from, or wrap it in nn.Parameter"
                )
            if id(param) in seen:
                raise OpcompValueError(
                    f"parameter {name} is given twice (in two param groups, or twice in one): each parameter "
                    "belongs to one group"
                )
            seen.add(id(param))
        return params

    def _capturing(self, modules: list[torch.nn.Module]) -> Capture:
        return Capture(self._plan.model, modules, self._likelihood, self._class_dim, self._reduction, self._prediction)

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
        old = self._plan
        self._plan = Plan(old.namespace, old.model, old.names, old.owners, sampling=old.sampling, head=head)
        self._plan.graphs = dict(old.graphs)
        for group, planned in zip(self.param_groups, old.groups):
            self._plan.add_group(old.graphs[group["expr"]], group["params"], planned.written)
        modules = self._plan.plan_layers([g["expr"] for g in self.param_groups])
        self._elementwise = Elementwise(self._elementwise.compile)
        if self._capture is not None and not modules:
            self._capture.close()
        if modules:
            self._capture = self._capture or self._capturing(modules)
            self._capture.retarget(modules, records)
        else:
            self._capture = None
        if loaded is not None:
            self.load_state_dict(loaded[0])
        self._arm()

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
        families = self._plan.families(self.param_groups)
        if not families:
            return loss
        grads = [p.grad for items in families.values() for _, _, params in items for p in params if p.grad is not None]
        if any(g.is_sparse for g in grads):
            raise OpcompError("sparse gradients are not supported; use nn.Embedding(sparse=False)")
        graphs = self._plan.graphs
        plain = self._in_place(families)
        if grads and len(plain) == len(families) and self._elementwise.guards(plain):
            self._step_guarded(plain, grads)
            return loss
        fallible = {e: items for e, items in families.items() if e not in plain}
        # steps without probes record their finiteness checks on the device and decide them once,
        # at the end (one read per step); probes decide each evaluation as it comes
        deferring = bool(fallible) and not self._probes()
        if grads and not deferring and not all_finite(grads):
            return self._skip(loss)
        # Every family computes its update before anything is decided: layer statistics and probes
        # hand theirs back, element-wise families step in place from a copy to go back to, and the
        # step is kept only when the gradients, the updates and what they wrote are all finite.
        # AdamW buckets run torch's fused kernel once the step is decided: nothing to copy.
        split = {e: torch_adamw(items) for e, items in families.items()}
        touched = [p for e in fallible for _, _, params in split[e][2] for p in params]
        stepped = [item for e in plain for item in split[e][2]]
        in_place = [p for _, _, params in stepped for p in params]
        replaced = {n.state_key for e in families for n in graphs[e].nodes if n.spec.replaces_state}
        saved = snapshot(self.state, touched, replaced, in_place) if touched or in_place else None
        kept = self._undo.keep(written(stepped, self.state))
        capture = self._capture
        statistics = StepStatistics(capture, self._reduction, self._parallel) if capture is not None else None
        try:
            with deferred_checks() if deferring else nullcontext([]) as pending:
                if deferring and grads:
                    finite(grads)
                updates = [
                    update
                    for expression in fallible
                    if split[expression][2]
                    for update in run_family(
                        self._plan, expression, split[expression][2], self.state, statistics, probe, self._parallel
                    )
                ]
                landings = [landing(update) for update in updates]
                finite([v for update, new in zip(updates, landings) for v in (*update.direction, *new)])
                for expression in plain:
                    self._elementwise.run_in_place(
                        expression, graphs[expression], split[expression][2], self.state, self._parallel
                    )
                finite(written(stepped, self.state))
            ok = self._device_decision(pending, saved, touched) if deferring and not plain else None
            if ok is None and not all_true(pending):
                raise NonFinite
        except BaseException as error:  # inf or NaN, or a closure or kernel that raised: nothing is kept
            if saved is not None:
                self.state = saved
            self._undo.restore(kept)
            if isinstance(error, NonFinite):
                return self._skip(loss)
            if self._capture is not None:
                self._capture.clear()
            raise
        for update, new in zip(updates, landings):
            land(update, new, ok)
        for items, nodes, _ in split.values():
            if items:
                step_adamw(items, self.state, nodes, None if ok is None else (~ok).to(torch.float32))
        if ok is not None:  # the step is kept, or undone, where ok says
            keep_where(ok, self.state, saved, touched, replaced)
            self._skips.counter(ok).add_((~ok).to(torch.int32))
            self._skips.after_device_step(stacklevel=4)
        if self._capture is not None:
            self._capture.clear()
            self._arm()
        return loss

    def _device_decision(self, pending: list[Tensor], saved, touched: list[Tensor]) -> Tensor | None:
        """The step's checks as one device flag, when the step can be kept or undone where it
        holds without the host reading it: on CUDA (:func:`decides_on_device`), for a step that
        created no state (a first step, a first refresh: then the host reads, as on the CPU) and
        that steps no element-wise family in place beside its layer statistics (the caller's
        ``plain``, which runs after the host decided)."""
        if not touched or not decides_on_device(touched) or not unchanged_layout(self.state, saved, touched):
            return None
        return together(pending, touched[0])

    def _in_place(self, families: dict) -> dict:
        """The families that step in place, in one function (compiled when they compile)."""
        graphs = self._plan.graphs
        return {e: f for e, f in families.items() if runs_in_place(graphs[e], [b.program for _, b, _ in f])}

    def _step_guarded(self, plain: dict, grads: list[Tensor]) -> None:
        """Element-wise families whose compiled steps check finiteness themselves: no value is read
        back from the device (a skip is counted there, see :mod:`opcomp.skips`)."""
        ok = None
        for expression, items in plain.items():
            graph = self._plan.graphs[expression]
            flag = self._elementwise.run_guarded(expression, graph, items, self.state, grads, self._skips, ok)
            if flag is not None:
                ok = flag
                continue
            # the compiler failed here: this family steps eagerly, decided on the host
            if ok is None and not all_finite(grads):
                self._skip(None)
                return
            if ok is not None and not bool(ok):
                break
            self._elementwise.run(expression, graph, items, self.state, self._parallel)
        if ok is not None:
            self._skips.after_device_step(stacklevel=4)

    @torch.no_grad()
    def warm_up(self) -> bool:
        """Compile the fused step now rather than in the first steps; True if there was one to compile.

        Runs the first two steps — the eager one that makes the state, and the one that compiles —
        on zero gradients and a scratch state, then puts back the parameters, their gradients, the
        state and the skip count: the optimizer steps afterwards exactly as if it had not warmed up,
        and its second step finds its graph compiled. Only expressions that compile
        (:class:`~opcomp.execute.Elementwise`) have anything to warm; it costs one copy of the
        parameters while it runs.
        """
        params = [p for group in self.param_groups for p in group["params"]]
        grads, values = [p.grad for p in params], None
        state, skips, started = self.state, self._skips, set(self._elementwise.started)
        try:
            for param in params:
                param.grad = torch.zeros_like(param)
            families = self._plan.families(self.param_groups)
            plain = self._in_place(families)
            if (
                not families
                or len(plain) < len(families)
                or not all(self._elementwise.compiles(torch_adamw(items)[2]) for items in plain.values())
            ):
                return False
            values = [p.detach().clone() for p in params]
            self.state, self._skips = snapshot(state, params), Skips()
            for _ in range(2):
                self._step(None, None)
        finally:
            for position, (param, grad) in enumerate(zip(params, grads)):
                if values is not None:
                    param.copy_(values[position])
                param.grad = grad
            self.state, self._skips, self._elementwise.started = state, skips, started
        return True

    def _skip(self, loss):
        if self._capture is not None:
            self._capture.clear()
        self._skips.skipped(stacklevel=4)
        return loss

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient, a probe or the step held inf or NaN (reads the device)."""
        return self._skips.count

    # -- state ------------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        """Load state saved by an opcomp optimizer over the same parameters (groups in order).

        State is matched by each node's canonical key, so an optimizer rebuilt with another
        expression takes over the state of every sub-expression the two share; state of nodes it
        does not have is dropped, with a warning that names them. Keys written by earlier versions
        of opcomp (before an option with a default was added) are read into today's spelling.
        The whole state_dict is checked first (:mod:`opcomp.checkpoint`: structure, learning rates,
        every buffer's shape, dtype and values); nothing is loaded unless all of it fits, and a
        refused load leaves the optimizer as it was. Floating state is cast to the parameters'
        working precision and device. The groups keep their current expressions; every other group
        setting (lr, initial_lr, …) is restored.
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
