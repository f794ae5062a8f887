"""One step of one expression: its buckets run node by node, and the updates are handed back.

Parameters of the param groups that share an expression are one *family*. :class:`Interpreter`
runs a family's programs in the graph's dependency order: an ordinary node once per bucket, a
collective one (layer statistics, probes) once over every parameter of the family that runs it,
and first of all, a node that rebinds ``g`` (``sam``) computes the gradient its argument reads.
It knows operators only through the registry's specs and the kernel tables.

A family without collective nodes or rebinding (an element-wise family) runs through the same
interpreter inside :class:`Elementwise`, compiled with ``torch.compile`` when asked, and applies
its updates in place. Other families hand their updates back: the optimizer applies them only
once every family has computed its own, so a probe that meets inf or NaN leaves the parameters
untouched.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from opcomp.closure import Probe, finite_flag
from opcomp.distributed import DataParallel, gathered, sharded_like
from opcomp.errors import OpcompNotice
from opcomp.graph import Graph, Node
from opcomp.kernels import COLLECTIVE, KERNELS, REBINDINGS
from opcomp.kernels.context import BucketStep, Ctx, ProbeCtx
from opcomp.kernels.elementwise import upcoming_second_moment
from opcomp.kernels.fused import adamw_node, fusable, fused_adamw, non_finite
from opcomp.kernels.layers import LayerCtx, LayerSlot
from opcomp.plan import LayerPlan, ParamInfo, Plan, Program
from opcomp.precision import working, working_dtype
from opcomp.skips import Skips
from opcomp.state import NodeState, entry, peek


@dataclass
class Update:
    """p ← p·(1 − lr·decay) − lr·u for one bucket."""

    lr: float | Tensor
    program: Program
    bucket: BucketStep
    direction: list[Tensor]


class Interpreter:
    """Runs one family's programs over its buckets and returns each bucket's direction.

    ``state`` (the optimizer's), ``layers`` (node id -> the layers it captures), ``infos``
    (parameters' owners), ``statistics`` and ``probe`` serve collective nodes; an element-wise
    family needs none of them.
    """

    def __init__(
        self,
        graph: Graph,
        programs: list[Program],
        buckets: list[BucketStep],
        *,
        state: Mapping | None = None,
        layers: Mapping[int, list[LayerPlan]] | None = None,
        infos: Mapping[int, ParamInfo] | None = None,
        statistics: Callable | None = None,
        probe: Probe | None = None,
        parallel: DataParallel | None = None,
    ) -> None:
        self.graph, self.programs, self.buckets = graph, programs, buckets
        self.state, self.layers, self.infos = state, layers, infos
        self.statistics, self.probe, self.parallel = statistics, probe, parallel
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
            out = kernel(LayerCtx(node.options, self._layer_slots(node, flat), self.statistics), *whole)
            out = sharded_like(out, flat.params)
        else:
            with torch.enable_grad():
                out = kernel(self._probe_ctx(node, flat.params, flat.states), *arguments)
        for i, values in flat.split(out).items():
            self.values[i][node.id] = values

    def _probe_ctx(self, node: Node, params: list[Tensor], states: list[dict], moments=None) -> ProbeCtx:
        grads = [None if p.grad is None else working(p.grad) for p in params]
        state = NodeState(states, params, node.state_key)
        return ProbeCtx(node.options, state, self.probe, grads, self._modules(params), moments)

    def _layer_slots(self, node: Node, flat: Flat) -> list[LayerSlot]:
        slots = []
        for layer in self.layers[node.id]:
            weight = flat.position.get(id(layer.weight)) if layer.weight is not None else None
            bias = flat.position.get(id(layer.bias)) if layer.bias is not None else None
            if weight is None and bias is None:
                continue  # no gradient this step
            own = entry(self.state, layer.owner, node.state_key)
            slots.append(LayerSlot(layer.module, layer.name, weight, bias, layer.columns, layer.kind, own))
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
    parallel: DataParallel | None = None,
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
        t for (_, bucket, _), step in zip(items, bucket_steps(items, state)) for t in _changing(bucket.program, step)
    ]


def bucket_steps(items: list, state: Mapping) -> list[BucketStep]:
    """This step's buckets of a family: the participating parameters with their state dicts."""
    return [BucketStep(params, [state[p] for p in params]) for _, _, params in items]


def runs_in_place(graph: Graph, programs) -> bool:
    """Programs with no layer statistics, probes or rebound gradients: they step in place, in one function."""
    if any(node.spec.binds_gradient for node in graph.nodes):
        return False
    return not any(COLLECTIVE.get(s.node.op) in ("layers", "probe") or s.node.scope for p in programs for s in p.steps)


def step_in_place(
    graph: Graph, programs: list[Program], buckets: list[BucketStep], lrs: list, parallel: DataParallel | None = None
) -> None:
    """Every bucket's direction and its update, in place — the function torch.compile fuses (which
    it does without ``parallel``: every rank then computes every matrix itself)."""
    directions = Interpreter(graph, programs, buckets, parallel=parallel).run()
    for program, bucket, lr, direction in zip(programs, buckets, lrs, directions):
        apply(Update(lr, program, bucket, direction))


class Elementwise:
    """Runs element-wise families: eagerly, or as one ``torch.compile``d step per family and
    participation (``compile``: "on", or "auto" on CUDA), the learning rates as 0-d tensors so
    schedules never recompile.

    A compiled family steps eagerly once first (it makes its state there, outside the graph);
    from then on its graph holds the step's finiteness check too (:func:`guarded`), so a step
    reads no value back from the device.
    """

    def __init__(self, compile: str) -> None:  # noqa: A002 - the option's documented name
        self.compile = compile
        self.runners: dict[tuple, Callable] = {}
        self.started: set[tuple] = set()
        self.lr_tensors: dict[tuple, Tensor] = {}

    def guards(self, families: Mapping[str, list]) -> bool:
        """Whether every one of ``families`` checks finiteness inside its own step: its buckets that
        run torch's fused AdamW from the first step, the others once their compiled step started."""
        return all(self._guarded(e, torch_adamw(items)[2]) for e, items in families.items())

    def _guarded(self, expression: str, rest: list) -> bool:
        return not rest or (self.compiles(rest) and _key(expression, rest) in self.started)

    def run(
        self, expression: str, graph: Graph, items: list, state: Mapping, parallel: DataParallel | None = None
    ) -> None:
        """One family, after the optimizer checked every gradient; eagerly, matrix work is split
        among ``parallel``'s ranks."""
        fused, nodes, rest = torch_adamw(items)
        if fused:
            step_adamw(fused, state, nodes, None)
        self.run_in_place(expression, graph, rest, state, parallel)

    def run_in_place(
        self, expression: str, graph: Graph, rest: list, state: Mapping, parallel: DataParallel | None = None
    ) -> None:
        """A family's buckets other than torch's fused AdamW (the last part of :func:`torch_adamw`),
        stepped eagerly in place."""
        if not rest:
            return
        lrs = [float(g["lr"]) for g, _, _ in rest]
        step_in_place(graph, [b.program for _, b, _ in rest], bucket_steps(rest, state), lrs, parallel)
        if self.compiles(rest):
            self.started.add(_key(expression, rest))

    def run_guarded(
        self,
        expression: str,
        graph: Graph,
        items: list,
        state: Mapping,
        check: list[Tensor],
        skips: Skips,
        ok: Tensor | None = None,
    ) -> Tensor | None:
        """One family through its self-checking step: its compiled graph, then its buckets that run
        torch's fused AdamW (:func:`torch_adamw`), told by the flag. The step's first family
        computes whether every gradient in ``check`` is finite and returns that flag; the others
        are given it as ``ok``. None when the compiler failed here (nothing of the family has
        stepped): the family then steps eagerly."""
        fused, nodes, rest = torch_adamw(items)
        found = None
        if rest:
            ok = self._compiled_step(expression, graph, rest, state, check, skips, ok)
            if ok is None:
                return None
        elif ok is None:
            found = non_finite(check)
            skips.counter(check[0]).add_(found.to(torch.int32))
            ok = found == 0
        if fused:
            step_adamw(fused, state, nodes, (~ok).to(torch.float32) if found is None else found)
        return ok

    def _compiled_step(
        self, expression: str, graph: Graph, items: list, state: Mapping, check: list, skips: Skips, ok
    ) -> Tensor | None:
        programs = [bucket.program for _, bucket, _ in items]
        key = _key(expression, items)
        runner = self.runners.get(key)
        if runner is None:
            announce_compile(expression, sum(len(params) for _, _, params in items))
            runner = self.runners[key] = compiled(graph, programs)
        buckets = bucket_steps(items, state)
        lrs = [self._lr_tensor(group, params[0]) for group, _, params in items]
        try:
            if ok is None:
                return runner(buckets, lrs, check, skips.counter(check[0]))
            return runner(buckets, lrs, [], skips.counter(ok), ok)
        except Exception as error:  # a compiler that cannot run here (no C compiler, an unsupported op)
            if self.compile == "on":
                raise
            self.compile = "off"
            warnings.warn(
                f"opcomp: torch.compile failed ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                "this optimizer steps eagerly from now on (compile='off' silences this)",
                RuntimeWarning,
                stacklevel=5,
            )
            return None

    def compiles(self, rest: list) -> bool:
        """Whether ``rest`` — a family's buckets other than torch's fused AdamW, the last part of
        :func:`torch_adamw` — step compiled; never when there are none. auto: on CUDA only. On the
        CPU a cold compile costs 5–40 s and pays back after 80–750 steps (``python -m
        opcomp.bench.compile_cost``, docs/performance.md), longer than many CPU runs: there it
        takes ``compile="on"``."""
        if not rest:
            return False
        if self.compile != "auto":
            return self.compile == "on"
        return any(p.is_cuda for _, _, params in rest for p in params)

    def _lr_tensor(self, group: dict, param: Tensor) -> Tensor:
        """The group's learning rate as a 0-d tensor in the parameters' working precision, refreshed
        every step: schedules never recompile."""
        key = (id(group), param.device, param.dtype)
        if key not in self.lr_tensors:
            self.lr_tensors[key] = torch.zeros((), dtype=working_dtype(param.dtype), device=param.device)
        tensor = self.lr_tensors[key]
        tensor.fill_(float(group["lr"]))
        return tensor


def torch_adamw(items: list) -> tuple[list, list[tuple[Node, float]], list]:
    """A family's items split: those whose bucket is torch's AdamW and runs its fused kernel
    (:mod:`opcomp.kernels.fused`), with their ``adam``/``adamw`` nodes and scales, and the rest."""
    fused, nodes, rest = [], [], []
    for item in items:
        node = adamw_node(item[1].program.steps)
        if node is not None and fusable(item[2]):
            fused.append(item)
            nodes.append(node)
        else:
            rest.append(item)
    return fused, nodes, rest


def step_adamw(items: list, state: Mapping, nodes: list, found_inf: Tensor | None) -> None:
    """Items of :func:`torch_adamw`, stepped by torch's fused kernel unless ``found_inf``. A step
    that would make their state (a first step) reads the flag first, so that a skipped one makes
    none, as a step decided on the host makes none."""
    fresh = any(
        node.state_key not in state.get(p, {}) for (_, _, params), (node, _) in zip(items, nodes) for p in params
    )
    if found_inf is not None and fresh and bool(found_inf):
        return
    for (group, planned, _), bucket, (node, scale) in zip(items, bucket_steps(items, state), nodes):
        decay, lr = planned.program.decay, float(group["lr"])
        fused_adamw(node.options, decay, bucket, node.state_key, lr, found_inf, scale)


def _key(expression: str, items: list) -> tuple:
    """A family's participation: which buckets step, with how many parameters."""
    return (expression, tuple((id(bucket), len(params)) for _, bucket, params in items))


def compiled(graph: Graph, programs: list[Program]) -> Callable:
    """:func:`guarded` compiled: inductor fuses each chain, its check and its keeping into few kernels."""
    return torch.compile(guarded(graph, programs))


def guarded(graph: Graph, programs: list[Program]) -> Callable:
    """:func:`step_in_place` that keeps everything as it was unless ``ok``: the function
    torch.compile fuses, where the check is one reduction over the gradients and the keeping a
    select inside each update's own kernel (the values before are the inputs it reads anyway).

    ``check`` (the first family of a step): the gradients whose finiteness decides, with ``ok``
    then computed here; else ``ok`` is the families' before. Either way the step is kept only if
    also everything it wrote (parameters, state) is finite, and a refusal adds a skip to ``skips``.
    """

    def step(buckets: list[BucketStep], lrs: list[Tensor], check: list[Tensor], skips: Tensor, ok=None):
        given = finite_flag(check) if ok is None else ok
        changing = [t for program, bucket in zip(programs, buckets) for t in _changing(program, bucket)]
        before = [t.clone() for t in changing]
        step_in_place(graph, programs, buckets, lrs)
        ok = given & finite_flag(changing)  # the update and all it wrote: finite, or nothing lands
        skipped = ~ok if check else given & ~ok  # a family after the first counts only its own refusal
        skips.add_(skipped.to(skips.dtype))
        for tensor, old in zip(changing, before):
            tensor.copy_(torch.where(ok, tensor, old))
        return ok

    return step


def _changing(program: Program, bucket: BucketStep) -> list[Tensor]:
    """What a step of ``program`` writes: the parameters and their nodes' state buffers."""
    keys = {s.node.state_key for s in program.steps}
    kept = [t for state in bucket.states for key, buffers in state.items() if key in keys for t in buffers.values()]
    return list(bucket.params) + kept


COMPILE_SECONDS_PER_TENSOR = 0.5
"""A cold compile's cost per parameter tensor, as measured on the CPU for the self-checking step:
0.3–0.5 s over 62–148 tensors (``python -m opcomp.bench.compile_cost``), more per tensor on
fewer."""


def announce_compile(expression: str, tensors: int) -> None:
    """One line before a first call compiles, so a long first step is never a silent one."""
    seconds = max(1, round(COMPILE_SECONDS_PER_TENSOR * tensors))
    warnings.warn(
        f"opcomp: compiling the fused step of {expression} over {tensors} tensors once, ~{seconds} s "
        "(later steps reuse it; compile='off' steps eagerly)",
        OpcompNotice,
        stacklevel=8,
    )
