"""opcomp.Optimizer: a torch.optim.Optimizer whose step runs an expression's graph per bucket."""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from typing import Literal

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from opcomp.capture import Capture, Likelihood
from opcomp.definitions import Namespace
from opcomp.errors import OpcompError
from opcomp.execute import FamilyStep, apply, compiled, run_elementwise, simple
from opcomp.explain import explain
from opcomp.graph import Graph
from opcomp.kernels import load as load_kernels
from opcomp.kernels.context import BucketStep
from opcomp.kernels.factors import Reduction, check_supported, statistics
from opcomp.kernels.layers import LayerSlot
from opcomp.lang.ast import Expr
from opcomp.ops import Applies
from opcomp.plan import Bucket, LayerPlan, ParamInfo, bucket_key, check_parameter, select
from opcomp.precision import working_dtype
from opcomp.probe import CLOSURE_SHAPE, NonFinite, Probe, all_finite, check_loss
from opcomp.state import check_buffers


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
        compile: Literal["auto", "on", "off"] = "auto",  # noqa: A002 - the option's documented name
    ) -> None:
        _check_lr(lr, "the optimizer")
        if compile not in ("auto", "on", "off"):
            raise OpcompError(f"compile must be 'auto', 'on' or 'off', got {compile!r}")
        self._compile = compile
        self._runners: dict[tuple, object] = {}  # compiled steps, per family and participation
        self._lr_tensors: dict[tuple, Tensor] = {}
        if reduction not in ("mean", "sum"):
            raise OpcompError(f"reduction must be 'mean' or 'sum' (how the loss combines examples), got {reduction!r}")
        if likelihood not in (None, "categorical", "gaussian"):
            raise OpcompError(f"likelihood must be 'categorical' or 'gaussian', got {likelihood!r}")
        if class_dim is not None and (isinstance(class_dim, bool) or not isinstance(class_dim, int) or class_dim == 0):
            raise OpcompError(
                f"class_dim is a dimension of the model's output other than the batch's 0, got {class_dim!r}"
            )
        self._namespace = namespace
        self._model = model
        self._names = dict(names or {})  # id(param) -> name
        self._owners = dict(owners or {})  # id(param) -> (owning module, attribute name)
        self._reduction = reduction
        self._likelihood = likelihood
        # classes on dim 1, as F.cross_entropy reads (N, C, …); a Gaussian's features last
        self._class_dim = class_dim if class_dim is not None else (1 if likelihood == "categorical" else -1)
        self._infos: dict[int, ParamInfo] = {}  # id(param) -> what its plan was made from
        self._layer_plans: dict[tuple[str, int], list[LayerPlan]] = {}  # (expression, node id) -> layers
        self._capture: Capture | None = None
        self._graphs: dict[str, Graph] = {}
        self._written: list[str] = []  # each group's expression as the user gave it
        self._buckets: list[list[Bucket]] = []  # per group
        load_kernels()  # registers every kernel family
        self.skipped_steps = 0
        self._warned_skip = False
        default = self._lower(expr)
        self._default = (expr if isinstance(expr, str) else default.canonical, default)
        super().__init__(params, {"lr": lr, "expr": default.canonical})

    # -- groups and plans -------------------------------------------------------------------------

    def _lower(self, expr: str | Expr) -> Graph:
        from opcomp import lower

        graph = lower(expr, self._namespace)
        self._graphs.setdefault(graph.canonical, graph)
        if graph.needs.model and self._model is None:
            needing = sorted({n.op for n in graph.nodes if n.spec.needs.model})
            raise OpcompError(
                f"'{needing[0]}' needs the model's layers: build with the module, "
                f"opcomp.build(expr, model), not with model.parameters()"
            )
        if self._likelihood is None and any(getattr(n.options, "fisher", None) == "mc" for n in graph.nodes):
            raise OpcompError(
                "fisher=mc samples labels from the model's output: say how, with "
                "opcomp.build(..., likelihood='categorical') for logits or likelihood='gaussian' for ½‖f − y‖²"
            )
        return graph

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise OpcompError(f"a param group is a dict with 'params', got {type(param_group).__name__}")
        group = dict(param_group)
        params = group.get("params", ())
        if isinstance(params, set):
            raise OpcompError("param group 'params' is a set; pass a list so the order is fixed")
        group["params"] = [params] if isinstance(params, Tensor) else list(params)
        if "lr" in group:
            _check_lr(group["lr"], f"param group {len(self.param_groups)}")
        if "expr" in group:
            graph = self._lower(group["expr"])
            written = group["expr"] if isinstance(group["expr"], str) else graph.canonical
        else:
            written, graph = self._default
        group["expr"] = graph.canonical
        buckets = self._plan(graph, group["params"], len(self.param_groups), written)
        super().add_param_group(group)
        self._written.append(written)
        self._buckets.append(buckets)
        self._plan_layers()

    def _plan(self, graph: Graph, params: list[Tensor], index: int, written: str) -> list[Bucket]:
        buckets: dict[tuple, Bucket] = {}
        for position, param in enumerate(params):
            name = self._names.get(id(param), f"#{position} of param group {index}")
            check_parameter(param, name)
            info = ParamInfo(name, tuple(param.shape), *self._owners.get(id(param), (None, None)))
            self._infos[id(param)] = info
            program = select(graph, info, written)
            bucket = buckets.setdefault(bucket_key(program, param), Bucket(program))
            bucket.params.append(param)
            bucket.names.append(name)
        return list(buckets.values())

    def _plan_layers(self) -> None:
        """Which layers run each layer node, per expression, and the hooks that feed them."""
        plans: dict[tuple[str, int], dict[torch.nn.Module, LayerPlan]] = defaultdict(dict)
        for group, buckets in zip(self.param_groups, self._buckets):
            for bucket in buckets:
                for step in bucket.program.steps:
                    if step.node.spec.applies is not Applies.LAYER:
                        continue
                    for param in bucket.params:
                        info = self._infos[id(param)]
                        layers = plans[(group["expr"], step.node.id)]
                        plan = layers.setdefault(info.module, LayerPlan(info.module, _layer_name(info), step.node))
                        setattr(plan, info.role, param)
        self._layer_plans = {key: list(layers.values()) for key, layers in plans.items()}
        modules = list(dict.fromkeys(plan.module for layers in self._layer_plans.values() for plan in layers))
        for plan in (p for layers in self._layer_plans.values() for p in layers):
            check_supported(plan.module, plan.name)
        if self._capture is not None:
            self._capture.close()
        self._capture = (
            Capture(self._model, modules, self._likelihood, self._class_dim, self._reduction) if modules else None
        )
        self._arm()

    def _arm(self) -> None:
        """Record layer inputs and output gradients only for a step where some node's statistics are due."""
        if self._capture is None:
            return
        due = [
            plan
            for plans in self._layer_plans.values()
            for plan in plans
            if plan.steps_taken(self.state) % plan.node.options.update_every == 0
        ]
        self._capture.armed = bool(due)
        self._capture.sample = any(getattr(p.node.options, "fisher", None) == "mc" for p in due)

    # -- the step ---------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step; returns the loss when given a closure.

        Expressions with probes need ``opt.step(closure)`` with a closure that returns the loss and
        calls no backward (see :mod:`opcomp.probe`); others accept that closure too, a torch-style
        closure that calls backward itself, or none after ``loss.backward()``.
        """
        graphs = [self._graphs[group["expr"]] for group in self.param_groups]
        probing = [n for graph in graphs for n in graph.nodes if n.spec.needs.closure]
        if closure is None and probing:
            raise OpcompError(
                f"'{probing[0].op}' evaluates the loss again during the step: call opt.step(closure) "
                f"with {CLOSURE_SHAPE}"
            )
        loss, probe = (None, None) if closure is None else self._evaluate(closure, graphs, bool(probing))
        loss = self._step(loss, probe)
        return probe.estimate() if loss is None and probe is not None else loss

    def _step(self, loss: Tensor | None, probe: Probe | None) -> Tensor | None:
        work = []
        for group, buckets in zip(self.param_groups, self._buckets):
            for bucket in buckets:
                takes = bucket.program.reads_gradient
                params = [p for p in bucket.params if p.grad is not None or not takes]
                if params:
                    work.append((group, bucket, params))
        grads = [p.grad for _, _, params in work for p in params if p.grad is not None]
        if not work:
            return loss
        if any(g.is_sparse for g in grads):
            raise OpcompError("sparse gradients are not supported; use nn.Embedding(sparse=False)")
        if grads and not all_finite(grads):
            return self._skip(loss)
        families: dict[str, list] = defaultdict(list)
        for group, bucket, params in work:
            families[group["expr"]].append((group, bucket, params))
        plain = {e: items for e, items in families.items() if simple([b.program for _, b, _ in items])}
        # the others (layer statistics, probes) can meet inf or NaN mid-step: they need a way back,
        # and they run first, so nothing has been applied when one gives up
        fallible = {e: items for e, items in families.items() if e not in plain}
        saved = _snapshot(self.state, [item for items in fallible.values() for item in items]) if fallible else None
        statistics = self._statistics()
        try:
            updates = [
                u
                for expression, items in fallible.items()
                for u in FamilyStep(self, expression, items, statistics, probe).run()
            ]
        except NonFinite:
            self.state = saved
            return self._skip(loss)
        except BaseException:  # a closure or kernel that raised: nothing of this step is kept
            self.state = saved
            if self._capture is not None:
                self._capture.clear()
            raise
        for update in updates:
            apply(update)
        for expression, items in plain.items():
            self._run_plain(expression, items)
        if self._capture is not None:
            self._capture.clear()
            self._arm()
        return loss

    def _run_plain(self, expression: str, items: list) -> None:
        """A family of element-wise programs: one function, compiled when ``compile`` says so."""
        programs = [bucket.program for _, bucket, _ in items]
        buckets = [BucketStep(params, [self.state[p] for p in params]) for _, _, params in items]
        if self._compiling(items):
            key = (expression, tuple((id(bucket), len(params)) for _, bucket, params in items))
            runner = self._runners.get(key)
            if runner is None:
                runner = self._runners[key] = compiled(programs)
            try:
                runner(buckets, [self._lr_tensor(group, params[0]) for group, _, params in items])
                return
            except Exception as error:  # a compiler that cannot run here (no C compiler, an unsupported op)
                if self._compile == "on":
                    raise
                self._compile = "off"
                warnings.warn(
                    f"opcomp: torch.compile failed ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                    "this optimizer steps eagerly from now on (compile='off' silences this)",
                    RuntimeWarning,
                    stacklevel=3,
                )
        run_elementwise(programs, buckets, [float(group["lr"]) for group, _, _ in items])

    def _compiling(self, items: list) -> bool:
        """auto: on CUDA, or on the CPU from a million parameters (a cold compile there takes seconds)."""
        if self._compile != "auto":
            return self._compile == "on"
        params = [p for _, _, params in items for p in params]
        return any(p.is_cuda for p in params) or sum(p.numel() for p in params) >= 1_000_000

    def _lr_tensor(self, group: dict, param: Tensor) -> Tensor:
        """The group's learning rate as a 0-d tensor in the parameters' working precision, refreshed
        every step: schedules never recompile."""
        key = (id(group), param.device, param.dtype)
        if key not in self._lr_tensors:
            self._lr_tensors[key] = torch.zeros((), dtype=working_dtype(param.dtype), device=param.device)
        tensor = self._lr_tensors[key]
        tensor.fill_(float(group["lr"]))
        return tensor

    def _evaluate(self, closure, graphs: list[Graph], probing: bool) -> tuple[Tensor | None, Probe | None]:
        """The closure's first call, at the current parameters, and opcomp's own backward pass."""
        params = [p for group in self.param_groups for p in group["params"]]
        nodes = [n for graph in graphs for n in graph.nodes]
        double = any(n.spec.needs.double_backward for n in nodes)
        # Gauss–Newton probes (gnvp, lgn) differentiate the loss at the model's recorded output
        outputs = any(n.spec.needs.closure and n.spec.needs.model for n in nodes)
        for param in params:
            param.grad = None
        if probing and not any(graph.trains for graph in graphs):
            # estimates from loss values alone (zo): no training pass, no graph; the probes run the closure
            return None, Probe(closure, self._model, self._disarmed, None, evaluations=0)
        recorder = _ModelCall(self._model if outputs else None)
        # fused attention kernels have no second derivative: differentiate through the math one
        backend = sdpa_kernel([SDPBackend.MATH]) if double else nullcontext()
        with torch.enable_grad(), recorder, backend:
            loss = closure()
        loss = check_loss(loss, probing=probing, params=params)
        if not probing and any(p.grad is not None for p in params):
            return loss.detach(), None  # a torch-style closure ran its own backward
        graph_grads = {}
        if loss.requires_grad and any(n.spec.reads_gradient for n in nodes):
            trainable = [p for p in params if p.requires_grad]
            with torch.enable_grad():
                grads = torch.autograd.grad(
                    loss, trainable, create_graph=double, retain_graph=probing, allow_unused=True
                )
            for param, grad in zip(trainable, grads):
                param.grad = None if grad is None else grad.detach()
                if double and grad is not None:
                    graph_grads[id(param)] = grad
        if not probing:
            return loss.detach(), None
        probe = Probe(closure, self._model, self._disarmed, loss, graph_grads, *recorder.recorded())
        return loss.detach(), probe

    @contextmanager
    def _disarmed(self):
        """Probe passes feed no layer statistics."""
        if self._capture is None:
            yield
            return
        armed, sample = self._capture.armed, self._capture.sample
        self._capture.armed = self._capture.sample = False
        try:
            yield
        finally:
            self._capture.armed, self._capture.sample = armed, sample

    def _statistics(self):
        """This step's statistics per (layer, columns, sampled), computed on first use."""
        if self._capture is None:
            return None
        entries = {module: self._capture.take(module) for module in self._capture.modules}
        cache: dict[tuple, object] = {}

        def statistics_of(layer: LayerSlot, sampled: bool):
            key = (layer.module, layer.columns, sampled)
            if key not in cache:
                usable = [e for e in entries[layer.module] if not sampled or e.sampled is not None]
                cache[key] = (
                    statistics(layer.module, usable, self._reduction, layer.columns, sampled) if usable else None
                )
            return cache[key]

        return statistics_of

    def _skip(self, loss):
        if self._capture is not None:
            self._capture.clear()
        self.skipped_steps += 1
        if not self._warned_skip:
            self._warned_skip = True
            warnings.warn(
                "opcomp: a gradient holds inf or NaN, so this step was skipped and nothing changed; "
                "opt.skipped_steps counts the skips (this warning is shown once)",
                RuntimeWarning,
                stacklevel=3,
            )
        return loss

    # -- state ------------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        """Load state saved by an opcomp optimizer over the same parameters (groups in order).

        State is matched by each node's canonical key, so an optimizer rebuilt with another
        expression takes over the state of every sub-expression the two share; state of nodes it
        does not have is dropped. Buffers stay fp32 whatever the parameter dtype. The groups keep
        their current expressions; every other group setting (lr, initial_lr, …) is restored.
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise OpcompError(
                f"the saved state has {len(saved_groups)} param groups, this optimizer {len(self.param_groups)}"
            )
        by_index: dict[int, Tensor] = {}
        for number, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise OpcompError(
                    f"param group {number}: the saved state has {len(saved['params'])} parameters, "
                    f"this optimizer {len(group['params'])}"
                )
            by_index.update(zip(saved["params"], group["params"]))
        programs = {id(p): b.program for buckets in self._buckets for b in buckets for p in b.params}
        layers = {(id(plan.owner), plan.node.state_key): plan for plans in self._layer_plans.values() for plan in plans}
        state: defaultdict = defaultdict(dict)
        for index, entries in state_dict["state"].items():
            param = by_index.get(index)
            if param is None:
                raise OpcompError(f"the saved state names parameter {index!r}, which no saved param group holds")
            if any(isinstance(v, Tensor) for v in entries.values()):
                raise OpcompError(
                    "this state_dict was not saved by an opcomp optimizer (its state is not keyed by expression)"
                )
            nodes = {s.node.state_key: s.node for s in programs[id(param)].steps}
            for key, buffers in entries.items():
                node, layer = nodes.get(key), layers.get((id(param), key))
                if node is None or (node.spec.applies is Applies.LAYER and layer is None):
                    continue  # a node this optimizer does not have, or a layer this parameter no longer holds
                check_buffers(f"parameter '{self._infos[id(param)].name}'", node, param, layer, buffers)
                state[param][key] = {name: _restore(tensor, param) for name, tensor in buffers.items()}
        for saved, group in zip(saved_groups, self.param_groups):
            group.update({k: v for k, v in saved.items() if k not in ("params", "expr")})
        self.state = state
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
        return {n: b.program.describe() for buckets in self._buckets for b in buckets for n in b.names}

    def rules(self) -> dict[str, str]:
        """Parameter name -> the rule of the rule file that chose its expression ('rule 2', 'default')."""
        return {
            n: group["rule"]
            for group, buckets in zip(self.param_groups, self._buckets)
            if "rule" in group
            for b in buckets
            for n in b.names
        }

    def explain(self) -> str:
        """Each group's graph and what every parameter runs."""
        parts = []
        runs = self.assignments()
        for index, (group, buckets) in enumerate(zip(self.param_groups, self._buckets)):
            rule = f"  ({group['rule']})" if "rule" in group else ""
            parts.append(f"param group {index}  lr={group['lr']}{rule}")
            parts.append(explain(self._graphs[group["expr"]], self._written[index]))
            parts.append("parameters:")
            rows = [(n, str(tuple(p.shape))) for b in buckets for n, p in zip(b.names, b.params)]
            width = max((len(n) for n, _ in rows), default=0)
            parts.extend(f"  {n:<{width}}  {s:<16} {runs[n]}{rule}" for n, s in rows)
            parts.append("")
        return "\n".join(parts).rstrip()


def _layer_name(info: ParamInfo) -> str:
    """The layer's name: its parameter's name without the attribute."""
    suffix = f".{info.role}"
    return info.name[: -len(suffix)] if info.name.endswith(suffix) else info.name


def _check_lr(lr, where: str) -> None:
    value = lr.item() if isinstance(lr, Tensor) and lr.numel() == 1 else lr
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise OpcompError(f"the learning rate of {where} must be a finite number >= 0, got {lr!r}")


def _snapshot(state, work) -> defaultdict:
    """A copy of the optimizer state, with the tensors of the parameters this step touches cloned."""
    touched = {id(p) for _, _, params in work for p in params}
    copy: defaultdict = defaultdict(dict)
    for param, entries in state.items():
        if id(param) in touched:
            copy[param] = {key: {n: t.clone() for n, t in buffers.items()} for key, buffers in entries.items()}
        else:
            copy[param] = entries
    return copy


class _ModelCall:
    """Records what the model's forward received and returned, while active (for Gauss–Newton products)."""

    def __init__(self, model: torch.nn.Module | None) -> None:
        self.model = model
        self.handle = None
        self.call: tuple = ((), {}, None)

    def __enter__(self):
        if self.model is not None:
            self.handle = self.model.register_forward_hook(self._keep, with_kwargs=True)
        return self

    def _keep(self, module, args, kwargs, output) -> None:
        self.call = (args, kwargs, output if isinstance(output, Tensor) else None)

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()

    def recorded(self) -> tuple:
        return self.call


def _restore(tensor: Tensor, param: Tensor) -> Tensor:
    """A saved buffer, copied onto its parameter's device (step counters included), dtype kept."""
    return tensor.detach().clone().to(device=param.device)
