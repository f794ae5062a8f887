"""The interpreter: one family's programs, node by node, over its buckets.

Parameters of the param groups that share an expression are one *family*. :class:`Interpreter`
runs a family's programs in the graph's dependency order: an ordinary node once per bucket, a
collective one (layer statistics, probes, a global norm) once over every parameter of the family
that runs it, and first of all, a node that rebinds ``g`` (``sam``) computes the gradient its
argument reads. It knows operators only through the registry's specs and the kernel tables, and
returns each bucket's direction; the routes (:mod:`opcomp.step`) decide what becomes of it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from opcomp.closure import Probe
from opcomp.distributed import DataParallel, gathered, sharded_like
from opcomp.finite import Checks
from opcomp.graph import Graph, Node
from opcomp.kernels import COLLECTIVE, KERNELS, REBINDINGS
from opcomp.kernels.context import BucketStep, Ctx, ProbeCtx
from opcomp.kernels.elementwise import upcoming_second_moment
from opcomp.kernels.layer_context import LayerCtx
from opcomp.layers.record import Layer, LayerSlot
from opcomp.plan import ParamInfo, Plan, Program
from opcomp.precision import working
from opcomp.state import NodeState, entry, peek
from opcomp.step.update import Update, bucket_steps


class Interpreter:
    """Runs one family's programs over its buckets and returns each bucket's direction.

    ``state`` (the optimizer's), ``layers`` (node id -> the layers it captures), ``infos``
    (parameters' owners), ``statistics``, ``probe`` and ``checks`` (the step's finiteness checks)
    serve collective nodes; an element-wise family needs none of them.
    """

    def __init__(
        self,
        graph: Graph,
        programs: list[Program],
        buckets: list[BucketStep],
        *,
        state: Mapping | None = None,
        layers: Mapping[int, list[Layer]] | None = None,
        infos: Mapping[int, ParamInfo] | None = None,
        statistics: Callable | None = None,
        probe: Probe | None = None,
        parallel: DataParallel | None = None,
        checks: Checks | None = None,
    ) -> None:
        self.graph, self.programs, self.buckets = graph, programs, buckets
        self.state, self.layers, self.infos = state, layers, infos
        self.statistics, self.probe, self.parallel = statistics, probe, parallel
        self.checks = checks if checks is not None else Checks(deferred=False)
        self.values: list[dict[int, list[Tensor]]] = [{} for _ in programs]

    def run(self) -> list[list[Tensor]]:
        for node in self.graph.nodes:
            if node.spec.binds_gradient:
                self._rebind(node)
        for node in self.graph.nodes:
            running = [(i, p.by_node[node.id]) for i, p in enumerate(self.programs) if node.id in p.by_node]
            if running:
                self._run(node, running)
        return [values[program.output] for values, program in zip(self.values, self.programs)]

    def _run(self, node: Node, running) -> None:
        kernel = KERNELS[node.op]
        collective = COLLECTIVE.get(node.op)
        if collective is None:
            for i, step in running:
                ctx = Ctx(node.options, self.buckets[i], node.state_key, scope=node.scope, parallel=self.parallel)
                self.values[i][node.id] = kernel(ctx, *(self.values[i][j] for j in step.inputs))
            return
        flat = Flat(self.buckets, running)
        arguments = flat.arguments(self.values, len(node.inputs))
        if collective == "global":
            out = kernel(Ctx(node.options, BucketStep(flat.params, flat.states), node.state_key), *arguments)
        elif collective == "layers":  # on whole matrices: FSDP2's shards gathered, and sharded again after
            whole = [gathered(values) for values in arguments]
            out = kernel(LayerCtx(node.options, self._layer_slots(node, flat), self.statistics, self.checks), *whole)
            out = sharded_like(out, flat.params)
        else:
            with torch.enable_grad():
                out = kernel(self._probe_ctx(node, flat.params, flat.states), *arguments)
        for i, values in flat.split(out).items():
            self.values[i][node.id] = values

    def _probe_ctx(self, node: Node, params: list[Tensor], states: list[dict], moments=None) -> ProbeCtx:
        grads = [None if p.grad is None else working(p.grad) for p in params]
        state = NodeState(states, params, node.state_key)
        return ProbeCtx(node.options, state, self.probe, grads, self._modules(params), self.checks, moments)

    def _layer_slots(self, node: Node, flat: Flat) -> list[LayerSlot]:
        slots = []
        for layer in self.layers[node.id]:
            weight = flat.position.get(id(layer.weight)) if layer.weight is not None else None
            bias = flat.position.get(id(layer.bias)) if layer.bias is not None else None
            if weight is None and bias is None:
                continue  # no gradient this step
            own = entry(self.state, layer.owner, node.state_key)
            slots.append(LayerSlot(layer, weight, bias, own))
        return slots

    def _modules(self, params: list[Tensor]) -> list[list[int]]:
        """Indices of ``params`` grouped by owning module (a lone parameter is its own layer)."""
        groups: dict[object, list[int]] = defaultdict(list)
        for index, param in enumerate(params):
            module = self.infos[id(param)].module
            groups[id(module) if module is not None else ("alone", id(param))].append(index)
        return list(groups.values())

    def _rebind(self, node: Node) -> None:
        """What ``g`` means inside ``node``, for every parameter whose program reads it there."""
        taking = [
            (i, k)
            for i, program in enumerate(self.programs)
            if node.id in program.by_node
            for k in range(len(self.buckets[i].params))
        ]
        if not taking:
            return
        params = [self.buckets[i].params[k] for i, k in taking]
        states = [self.buckets[i].states[k] for i, k in taking]

        def second_moments() -> list[Tensor | None]:
            return [self._second_moment(node, self.programs[i], self.buckets[i], k) for i, k in taking]

        with torch.enable_grad():
            rebound = REBINDINGS[node.op](self._probe_ctx(node, params, states, second_moments))
        for (i, k), value in zip(taking, rebound):
            self.buckets[i].probed.setdefault(node.key, [None] * len(self.buckets[i].params))[k] = value

    def _second_moment(self, node: Node, program: Program, bucket: BucketStep, k: int) -> Tensor | None:
        """v̂ of the first node inside ``node`` that declares a second moment, after this step's raw
        update (without changing it); None when the parameter's inner keeps none."""
        for step in program.steps:
            declared = step.node.spec.second_moment
            if step.node.scope == node.key and declared is not None:
                kept = peek(bucket.states[k], step.node.state_key)
                return upcoming_second_moment(declared, step.node.options, kept, bucket.grads[k])
        return None


def run_family(
    plan: Plan,
    expression: str,
    items: list,
    state: Mapping,
    statistics,
    probe: Probe | None,
    parallel: DataParallel | None,
    checks: Checks,
) -> list[Update]:
    """One family with layer statistics or probes: its updates, not yet applied.

    ``items`` are (group, bucket, participating parameters), from :meth:`Plan.families`.
    """
    programs = [bucket.program for _, bucket, _ in items]
    buckets = bucket_steps(items, state)
    interpreter = Interpreter(
        plan.graphs[expression],
        programs,
        buckets,
        state=state,
        layers=plan.layers_of(expression),
        infos=plan.infos,
        statistics=statistics,
        probe=probe,
        parallel=parallel,
        checks=checks,
    )
    directions = interpreter.run()
    return [
        Update(float(group["lr"]), program, bucket, direction)
        for (group, _, _), program, bucket, direction in zip(items, programs, buckets, directions)
    ]


class Flat:
    """The parameters of several buckets running one node, as one list, and back."""

    def __init__(self, buckets: list[BucketStep], running) -> None:
        self.running = running
        self.slots = [(i, k) for i, _ in running for k in range(len(buckets[i].params))]
        self.params = [buckets[i].params[k] for i, k in self.slots]
        self.states = [buckets[i].states[k] for i, k in self.slots]
        self.position = {id(p): n for n, p in enumerate(self.params)}
        self.buckets = buckets

    def arguments(self, values, count: int) -> list[list[Tensor]]:
        steps = dict(self.running)
        return [[values[i][steps[i].inputs[a]][k] for i, k in self.slots] for a in range(count)]

    def split(self, out: list[Tensor]) -> dict[int, list[Tensor]]:
        return {i: [out[self.position[id(p)]] for p in self.buckets[i].params] for i, _ in self.running}
