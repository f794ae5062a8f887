"""opcomp.Optimizer: a torch.optim.Optimizer whose step runs an expression's graph per bucket."""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Mapping

import torch
from torch import Tensor

from opcomp.definitions import Namespace
from opcomp.errors import OpcompError
from opcomp.explain import explain
from opcomp.graph import Graph
from opcomp.kernels import load as load_kernels
from opcomp.kernels.context import BucketStep, Ctx
from opcomp.lang.ast import Expr
from opcomp.plan import Bucket, ParamInfo, Program, bucket_key, check_parameter, select


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
        layers: Mapping[int, str] | None = None,
    ) -> None:
        _check_lr(lr, "the optimizer")
        self._namespace = namespace
        self._model = model
        self._names = dict(names or {})  # id(param) -> name
        self._layers = dict(layers or {})  # id(param) -> class name of the owning module
        self._graphs: dict[str, Graph] = {}
        self._written: list[str] = []  # each group's expression as the user gave it
        self._buckets: list[list[Bucket]] = []  # per group
        self._kernels = load_kernels()
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
            needing = sorted({n.op for n in graph.nodes if n.spec.needs_for(n.options).model})
            raise OpcompError(
                f"'{needing[0]}' needs the model's layers: build with the module, "
                f"opcomp.build(expr, model), not with model.parameters()"
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

    def _plan(self, graph: Graph, params: list[Tensor], index: int, written: str) -> list[Bucket]:
        buckets: dict[tuple, Bucket] = {}
        for position, param in enumerate(params):
            name = self._names.get(id(param), f"#{position} of param group {index}")
            check_parameter(param, name)
            info = ParamInfo(name, tuple(param.shape), self._layers.get(id(param)))
            program = select(graph, info, written)
            for step in program.steps:
                if step.node.op not in self._kernels:
                    raise OpcompError(
                        f"'{step.node.op}' is in the catalogue but opcomp.build cannot run it yet "
                        f"(needed for parameter {info.describe()})",
                        step.node.span,
                    )
            bucket = buckets.setdefault(bucket_key(program, param), Bucket(program))
            bucket.params.append(param)
            bucket.names.append(name)
        return list(buckets.values())

    # -- the step ---------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step; ``closure`` (optional) re-evaluates the loss and returns it."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for group, buckets in zip(self.param_groups, self._buckets):
            for bucket in buckets:
                params = [p for p in bucket.params if p.grad is not None]
                if params:
                    work.append((group, bucket, params))
        grads = [p.grad for _, _, params in work for p in params]
        if not grads:
            return loss
        if any(g.is_sparse for g in grads):
            raise OpcompError("sparse gradients are not supported; use nn.Embedding(sparse=False)")
        if not _all_finite(grads):
            self._skip()
            return loss
        for group, bucket, params in work:
            self._run(float(group["lr"]), bucket.program, params)
        return loss

    def _run(self, lr: float, program: Program, params: list[Tensor]) -> None:
        bucket = BucketStep(params, [self.state[p] for p in params])
        values: dict[int, list[Tensor]] = {}
        for step in program.steps:
            ctx = Ctx(step.node.options, bucket, step.node.state_key)
            values[step.node.id] = self._kernels[step.node.op](ctx, *(values[i] for i in step.inputs))
        update = values[program.output]
        if params[0].dtype == torch.float32:
            if program.decay:
                torch._foreach_mul_(params, 1.0 - lr * program.decay)
            torch._foreach_add_(params, update, alpha=-lr)
        else:  # low precision: update in fp32, round once
            new = torch._foreach_mul(bucket.params32, 1.0 - lr * program.decay)
            torch._foreach_add_(new, update, alpha=-lr)
            for param, value in zip(params, new):
                param.copy_(value)

    def _skip(self) -> None:
        self.skipped_steps += 1
        if not self._warned_skip:
            self._warned_skip = True
            warnings.warn(
                "opcomp: a gradient holds inf or NaN, so this step was skipped and nothing changed; "
                "opt.skipped_steps counts the skips (this warning is shown once)",
                RuntimeWarning,
                stacklevel=3,
            )

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
        state: defaultdict = defaultdict(dict)
        for index, entries in state_dict["state"].items():
            param = by_index.get(index)
            if param is None:
                raise OpcompError(f"the saved state names parameter {index!r}, which no saved param group holds")
            if any(isinstance(v, Tensor) for v in entries.values()):
                raise OpcompError(
                    "this state_dict was not saved by an opcomp optimizer (its state is not keyed by expression)"
                )
            keep = {s.node.state_key for s in programs[id(param)].steps}
            state[param] = {
                key: {name: _restore(name, tensor, param) for name, tensor in buffers.items()}
                for key, buffers in entries.items()
                if key in keep
            }
        for saved, group in zip(saved_groups, self.param_groups):
            group.update({k: v for k, v in saved.items() if k not in ("params", "expr")})
        self.state = state

    # -- people -----------------------------------------------------------------------------------

    def explain(self) -> str:
        """Each group's graph and what every parameter runs."""
        parts = []
        for index, (group, buckets) in enumerate(zip(self.param_groups, self._buckets)):
            parts.append(f"param group {index}  lr={group['lr']}")
            parts.append(explain(self._graphs[group["expr"]], self._written[index]))
            parts.append("parameters:")
            rows = [(n, tuple(p.shape), b.program.describe()) for b in buckets for n, p in zip(b.names, b.params)]
            width = max((len(n) for n, _, _ in rows), default=0)
            parts.extend(f"  {n:<{width}}  {str(s):<16} {d}" for n, s, d in rows)
            parts.append("")
        return "\n".join(parts).rstrip()


def _check_lr(lr, where: str) -> None:
    value = lr.item() if isinstance(lr, Tensor) and lr.numel() == 1 else lr
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise OpcompError(f"the learning rate of {where} must be a finite number >= 0, got {lr!r}")


def _all_finite(grads: list[Tensor]) -> bool:
    """Whether every gradient element is finite, exactly, at the cost of one sum per tensor.

    A finite sum proves its elements finite (an infinity never cancels to a finite value); a
    non-finite sum is an inf or NaN element, or finite values that overflow, which the exact
    min/max check (NaN propagates through both) tells apart.
    """
    groups: dict[tuple, list[Tensor]] = defaultdict(list)
    for grad in grads:
        groups[(grad.device, grad.dtype)].append(grad)
    for same in groups.values():
        if not bool(torch.stack([g.sum() for g in same]).isfinite().all()):
            if not all(bool(torch.stack(torch.aminmax(g)).isfinite().all()) for g in same):
                return False
    return True


def _restore(name: str, tensor: Tensor, param: Tensor) -> Tensor:
    """A saved buffer, copied onto the parameter's device; step counters stay on the CPU."""
    if name == "step":
        return tensor.detach().clone().cpu()
    return tensor.detach().clone().to(device=param.device)
