"""One step of one expression: its buckets run node by node, and the updates are handed back.

Parameters of the param groups that share an expression are one *family*. Nodes run in the
graph's dependency order; an ordinary node runs once per bucket, a collective one (layer
statistics, probes) once over every parameter of the family that runs it. Nothing is applied
here: the optimizer applies all families' updates only once every family has computed its own,
so a probe that meets inf or NaN leaves the parameters untouched.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from opcomp.graph import Graph, Node
from opcomp.kernels import COLLECTIVE, KERNELS
from opcomp.kernels.context import BucketStep, Ctx
from opcomp.kernels.layers import LayerCtx, LayerSlot
from opcomp.kernels.probes import SECOND_MOMENTS, ProbeCtx, own_second_moment, probed_gradients, upcoming_second_moment
from opcomp.plan import Bucket, Program
from opcomp.precision import working, working_dtype


@dataclass
class Update:
    """p ← p·(1 − lr·decay) − lr·u for one bucket."""

    lr: float
    program: Program
    bucket: BucketStep
    direction: list[Tensor]


class FamilyStep:
    """Runs one family; ``optimizer`` provides state, kernels, layer plans and parameter infos."""

    def __init__(self, optimizer, expression: str, items: list[tuple[dict, Bucket, list[Tensor]]], statistics, probe):
        self.optimizer = optimizer
        self.expression = expression
        self.graph: Graph = optimizer._graphs[expression]
        self.items = items
        self.statistics = statistics
        self.probe = probe
        self.buckets = [BucketStep(params, [optimizer.state[p] for p in params]) for _, _, params in items]
        self.values: list[dict[int, list[Tensor]]] = [{} for _ in items]

    def run(self) -> list[Update]:
        for node in self.graph.nodes:
            if node.spec.binds_gradient:
                self._probe_gradients(node)
        for node in self.graph.nodes:
            running = [(i, item[1].program.step_of(node.id)) for i, item in enumerate(self.items)]
            running = [(i, step) for i, step in running if step is not None]
            if running:
                self._run(node, running)
        return [
            Update(float(group["lr"]), bucket.program, self.buckets[i], self.values[i][bucket.program.output])
            for i, (group, bucket, _) in enumerate(self.items)
        ]

    def _run(self, node: Node, running) -> None:
        kernel = KERNELS[node.op]
        collective = COLLECTIVE.get(node.op)
        if collective is None:
            for i, step in running:
                ctx = Ctx(node.options, self.buckets[i], node.state_key, scope=node.scope)
                self.values[i][node.id] = kernel(ctx, *(self.values[i][j] for j in step.inputs))
            return
        flat = Flat(self.buckets, running)
        arguments = flat.arguments(self.values, len(node.inputs))
        if collective == "layers":
            out = kernel(LayerCtx(node.options, self._layers(node, flat), self.statistics), *arguments)
        else:
            states = [self.optimizer.state[p].setdefault(node.state_key, {}) for p in flat.params]
            grads = [None if p.grad is None else working(p.grad) for p in flat.params]
            ctx = ProbeCtx(node.options, node.state_key, flat.params, states, self.probe, grads, self._modules(flat))
            with torch.enable_grad():
                out = kernel(ctx, *arguments)
        for i, values in flat.split(out).items():
            self.values[i][node.id] = values

    def _layers(self, node: Node, flat: Flat) -> list[LayerSlot]:
        layers = []
        for plan in self.optimizer._layer_plans[(self.expression, node.id)]:
            weight = flat.position.get(id(plan.weight)) if plan.weight is not None else None
            bias = flat.position.get(id(plan.bias)) if plan.bias is not None else None
            if weight is None and bias is None:
                continue  # no gradient this step
            state = self.optimizer.state[plan.owner].setdefault(node.state_key, {})
            layers.append(LayerSlot(plan.module, plan.name, weight, bias, plan.columns, state))
        return layers

    def _modules(self, flat: Flat) -> list[list[int]]:
        """Indices of the flat parameters grouped by owning module (a lone parameter is its own layer)."""
        groups: dict[object, list[int]] = defaultdict(list)
        for index, param in enumerate(flat.params):
            module = self.optimizer._infos[id(param)].module
            groups[id(module) if module is not None else ("param", id(param))].append(index)
        return list(groups.values())

    def _probe_gradients(self, node: Node) -> None:
        """g_sam for every parameter whose program reads ``g`` inside this node."""
        scope = node.key
        taking = [
            (i, k)
            for i, item in enumerate(self.items)
            if item[1].program.step_of(node.id)
            for k in range(len(self.buckets[i].params))
        ]
        if not taking:
            return
        params = [self.buckets[i].params[k] for i, k in taking]
        grads = [self.buckets[i].grads[k] for i, k in taking]
        moments = [
            self._second_moment(node, self.items[i][1].program, p, g) for (i, _), p, g in zip(taking, params, grads)
        ]
        probed = probed_gradients(node.options, params, grads, moments, self.probe)
        for (i, k), value in zip(taking, probed):
            self.buckets[i].probed.setdefault(scope, [None] * len(self.buckets[i].params))[k] = value

    def _second_moment(self, node: Node, program: Program, param: Tensor, grad: Tensor):
        """v̂ for sam[mode=fisher]: the inner's second moment after this step's raw update, or sam's own."""
        if node.options.mode != "fisher":
            return None
        state = self.optimizer.state[param]
        for step in program.steps:
            if step.node.scope == node.key and step.node.op in SECOND_MOMENTS:
                return upcoming_second_moment(step.node.op, step.node.options, state.get(step.node.state_key, {}), grad)
        return own_second_moment(state.setdefault(node.state_key, {}), grad)


class Flat:
    """The parameters of several buckets running one node, as one list, and back."""

    def __init__(self, buckets: list[BucketStep], running) -> None:
        self.running = running
        self.slots = [(i, k) for i, _ in running for k in range(len(buckets[i].params))]
        self.params = [buckets[i].params[k] for i, k in self.slots]
        self.position = {id(p): n for n, p in enumerate(self.params)}
        self.buckets = buckets

    def arguments(self, values, count: int) -> list[list[Tensor]]:
        steps = dict(self.running)
        return [[values[i][steps[i].inputs[a]][k] for i, k in self.slots] for a in range(count)]

    def split(self, out: list[Tensor]) -> dict[int, list[Tensor]]:
        return {i: [out[self.position[id(p)]] for p in self.buckets[i].params] for i, _ in self.running}


def apply(update: Update) -> None:
    """p ← p·(1 − lr·decay) − lr·u, in the working precision: rounded once for half-precision
    parameters, in place for fp32 and fp64 ones.

    ``lr`` is a float when eager and a 0-d tensor when compiled (so schedules never recompile).
    """
    params, lr, decay = update.bucket.params, update.lr, update.program.decay
    low = params[0].dtype != working_dtype(params[0].dtype)
    target = torch._foreach_mul(update.bucket.working_params, 1.0) if low else params
    if decay:
        torch._foreach_mul_(target, 1.0 - lr * decay)
    if isinstance(lr, Tensor):
        torch._foreach_sub_(target, torch._foreach_mul(update.direction, lr))
    else:
        torch._foreach_add_(target, update.direction, alpha=-lr)
    if target is not params:
        for param, value in zip(params, target):
            param.copy_(value)


def simple(programs) -> bool:
    """Programs with no layer statistics, probes or probed gradients: one function can run them."""
    return not any(
        COLLECTIVE.get(s.node.op) or s.node.scope or s.node.spec.binds_gradient for p in programs for s in p.steps
    )


def run_elementwise(programs: list[Program], buckets: list[BucketStep], lrs: list) -> None:
    """Every bucket's program and its update, in place — the function torch.compile fuses."""
    for program, bucket, lr in zip(programs, buckets, lrs):
        values: dict[int, list[Tensor]] = {}
        for step in program.steps:
            node = step.node
            ctx = Ctx(node.options, bucket, node.state_key, scope=node.scope)
            values[node.id] = KERNELS[node.op](ctx, *(values[i] for i in step.inputs))
        apply(Update(lr, program, bucket, values[program.output]))


def compiled(programs: list[Program]):
    """``run_elementwise`` for these programs, compiled: inductor fuses each chain into few kernels."""

    def step(buckets: list[BucketStep], lrs: list[Tensor]) -> None:
        run_elementwise(programs, buckets, lrs)

    return torch.compile(step)
