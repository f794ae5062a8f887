"""The execution plan: which nodes each parameter runs, and the buckets that run them together.

For every parameter the graph's fallbacks are resolved once, at build time: a branch applies when
every node in it does (``orth`` needs a matrix, ``kfac`` a supported layer). What remains is the
parameter's :class:`Program`. Parameters of one param group with the same program, shape, dtype
and device form a :class:`Bucket`, and each operator runs once per bucket per step.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from opcomp.errors import OpcompError, OpcompTypeError, OpcompValueError
from opcomp.explain import explain
from opcomp.graph import Graph, Node, lower
from opcomp.head import guess
from opcomp.lang.ast import Expr
from opcomp.layers.kinds import LayerKind, kind_of, unsupported
from opcomp.layers.record import Layer
from opcomp.ops import Applies
from opcomp.precision import working_dtype

APPLIES_NEEDS = {
    Applies.MATRIX: "a matrix (ndim >= 2)",
    Applies.LAYER: "a weight or bias of a Linear (or subclass), Conv1D, Conv2d or Embedding layer, not tied to "
    "another module and not inside a MultiheadAttention",
    Applies.HIDDEN: "the weight of a hidden Linear, Conv1D or Conv2d layer (not an embedding, the output head, "
    "a tied or a raw parameter)",
}


@dataclass(frozen=True)
class ParamInfo:
    """What applicability depends on: the parameter's shape and the module that owns it."""

    name: str
    shape: tuple[int, ...]
    module: nn.Module | None = None  # the module owning the parameter, when a model was given
    role: str | None = None  # its attribute name there: 'weight', 'bias', …
    kind: LayerKind | None = None  # what that module computes, if it is a layer whose statistics opcomp captures
    tied: bool = False  # one tensor held by several modules (a tied embedding and output head)
    unhookable: bool = False  # its module computes where no hook reaches (inside a MultiheadAttention)
    head: bool = False  # its module is the model's output head (the layer that produces the prediction)
    refused: str | None = None  # why a layer of a known type has no statistics (an unsupported configuration)

    @property
    def layer(self) -> bool:
        """A weight or bias of a capturable layer, held by that layer alone."""
        return self.kind is not None and self.role in ("weight", "bias") and not self.tied

    def satisfies(self, applies: Applies) -> bool:
        if applies is Applies.MATRIX:
            return len(self.shape) >= 2
        if applies is Applies.LAYER:
            return self.layer
        if applies is Applies.HIDDEN:  # without a model there is nothing to tell hidden layers by
            hidden = self.kind is not None and self.kind.head and self.role == "weight" and not (self.tied or self.head)
            return len(self.shape) >= 2 and (self.module is None or hidden)
        return True

    def describe(self) -> str:
        owner = f", in a {type(self.module).__name__}" if self.module is not None else ""
        return f"'{self.name}' (shape {tuple(self.shape)}{owner})"


@dataclass(frozen=True)
class Step:
    """Run ``node`` on the values of ``inputs`` (node ids, fallbacks already resolved)."""

    node: Node
    inputs: tuple[int, ...]


@dataclass(frozen=True)
class Program:
    """The nodes one parameter runs, in dependency order; the last step's value is its update.

    ``decay`` is decoupled weight decay peeled off a root of the form ``x + c * p``: the step is
    then ``p ← p·(1 − lr·c) − lr·x``, torch.optim's own order (AdamW, Muon), without materialising
    ``c·p`` or the sum.
    """

    steps: tuple[Step, ...]
    decay: float = 0.0
    by_node: dict[int, Step] = field(init=False, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_node", {step.node.id: step for step in self.steps})

    @property
    def output(self) -> int:
        return self.steps[-1].node.id

    def step_of(self, node_id: int) -> Step | None:
        return self.by_node.get(node_id)

    @property
    def reads_gradient(self) -> bool:
        """Whether it needs the training backward; zeroth-order programs step without one."""
        return any(step.node.spec.reads_gradient for step in self.steps)

    def describe(self) -> str:
        """The operators it runs, outermost first: ``muon ← kfac``, ``0.1 × adamw``."""
        parts, factor = [], ""
        for step in reversed(self.steps):
            if step.node.op == "scale":
                factor += f"{step.node.options.c:g} × "
            elif step.node.op not in ("g", "p"):
                parts.append(factor + step.node.op)
                factor = ""
        if not parts:  # the gradient (or parameter) itself, perhaps scaled: plain SGD
            parts.append(factor + self.steps[0].node.op)
        return " ← ".join(parts) + (f" (weight decay {self.decay:g})" if self.decay else "")


def peel_decay(program: Program) -> Program:
    """``x + c * p`` (or ``c * p + x``, ``x + p``) at the root becomes ``x`` with decay ``c``."""
    by_id = {step.node.id: step for step in program.steps}
    root = program.steps[-1]
    if root.node.op != "sum" or len(root.inputs) != 2 or root.node.options.ops != ("+",):
        return program

    def decay_of(node_id: int) -> float | None:
        step = by_id[node_id]
        if step.node.op == "p":
            return 1.0
        if step.node.op == "scale" and by_id[step.inputs[0]].node.op == "p":
            return step.node.options.c
        return None

    for term, other in (root.inputs, root.inputs[::-1]):
        decay = decay_of(term)
        if decay is None:
            continue
        # Only the decay term's own nodes go; whatever remains feeds ``other``, so it comes last.
        dropped = {root.node.id, term, *by_id[term].inputs} - {other}
        kept = [s for s in program.steps if s.node.id not in dropped or _used(s.node.id, program, dropped)]
        return Program(tuple(kept), decay)
    return program


def _used(node_id: int, program: Program, dropped: set[int]) -> bool:
    """Whether a step outside ``dropped`` reads ``node_id``."""
    return any(node_id in s.inputs for s in program.steps if s.node.id not in dropped)


def select(graph: Graph, info: ParamInfo, written: str) -> Program:
    """The program of one parameter, or an OpcompError naming it and the operator that refuses it.

    ``written`` is the expression as the user gave it, for the suggested fix.
    """
    applies, chosen = applicability(graph, info)
    if not applies[graph.root.id]:
        raise _refusal(info, blame(graph, graph.root, applies, info), written)

    def resolve(node_id: int) -> int:
        while node_id in chosen:
            node_id = chosen[node_id]
        return node_id

    needed: set[int] = set()
    pending = [resolve(graph.root.id)]
    while pending:
        node_id = pending.pop()
        if node_id not in needed:
            needed.add(node_id)
            pending.extend(resolve(i) for i in graph.nodes[node_id].inputs)
    steps = tuple(Step(node, tuple(resolve(i) for i in node.inputs)) for node in graph.nodes if node.id in needed)
    return peel_decay(Program(steps))


def applicability(graph: Graph, info: ParamInfo) -> tuple[dict[int, bool], dict[int, int]]:
    """Whether each node applies to the parameter, and the branch each fallback takes for it."""
    applies: dict[int, bool] = {}
    chosen: dict[int, int] = {}
    for node in graph.nodes:
        if node.op == "fallback":
            branch = next((i for i in node.inputs if applies[i]), None)
            applies[node.id] = branch is not None
            if branch is not None:
                chosen[node.id] = branch
        else:
            applies[node.id] = info.satisfies(node.applies) and all(applies[i] for i in node.inputs)
    return applies, chosen


def fallen_back(graph: Graph, info: ParamInfo) -> list[tuple[Node, Node]]:
    """Each fallback the parameter's program passes through whose first branch it does not take,
    outermost first, with the operator that keeps that branch from it. Fallbacks anywhere count
    (``momentum(kfac(g) | g)`` falls back inside ``momentum``), not only one at the root."""
    applies, chosen = applicability(graph, info)
    found: list[tuple[Node, Node]] = []
    pending, seen = [graph.root.id], set()
    while pending:
        node = graph.nodes[pending.pop()]
        if node.id in seen:
            continue
        seen.add(node.id)
        if node.op != "fallback":
            pending.extend(node.inputs)
        elif node.id in chosen:
            first = graph.nodes[node.inputs[0]]
            if chosen[node.id] != first.id:
                found.append((node, blame(graph, first, applies, info)))
            pending.append(chosen[node.id])
    return sorted(found, key=lambda pair: -pair[0].id)


NEEDS = {
    Applies.MATRIX: "a matrix",
    Applies.LAYER: "a layer of its own that hooks can see",
    Applies.HIDDEN: "a hidden layer's weight",
}
LAYER_TYPES = {
    Applies.LAYER: "Linear, Conv2d, Embedding and Hugging Face Conv1D layers",
    Applies.HIDDEN: "the weights of Linear, Conv2d and Hugging Face Conv1D layers",
}


def why_not(culprit: Node, info: ParamInfo) -> str:
    """Why ``culprit`` does not apply to the parameter, in a few words: what the parameter is, and
    what the operator takes."""
    applies, op = culprit.applies, culprit.op
    owner = type(info.module).__name__ if info.module is not None else None
    needs = f"{op} needs {NEEDS[applies]}"
    if applies is Applies.MATRIX or (applies is Applies.HIDDEN and len(info.shape) < 2):
        return f"{len(info.shape)}-D parameters ({needs})"
    if applies is Applies.HIDDEN and info.head:
        return f"the output head's weight ({needs})"
    if applies is Applies.HIDDEN and info.kind is not None and not info.kind.head:
        return f"{info.kind.name}s ({needs})"
    if info.tied:
        return f"parameters tied to another module ({needs})"
    if owner is None:
        return f"parameters outside any module ({needs})"
    if info.unhookable:
        return f"parameters inside a MultiheadAttention, which projects where no hook reaches ({needs})"
    if info.refused is not None:
        return f"{info.refused} ({needs})"
    if info.kind is None:
        takes = LAYER_TYPES[applies]
        return f"{owner} parameters ({owner} is a layer type opcomp has no statistics for; {op} takes {takes})"
    return f"{info.role} parameters of a {owner} ({needs})"


def blame(graph: Graph, node: Node, applies: dict[int, bool], info: ParamInfo) -> Node:
    """The operator that keeps ``node`` from applying to the parameter."""
    while True:
        if node.op == "fallback":
            node = graph.nodes[node.inputs[-1]]
        elif not info.satisfies(node.applies):
            return node
        else:
            node = next(graph.nodes[i] for i in node.inputs if not applies[i])


def _refusal(info: ParamInfo, culprit: Node, written: str) -> OpcompError:
    example = f"{written} | adamw(g)" if len(written) <= 60 else "… | adamw(g)"
    refused = f" ({info.refused})" if info.refused is not None else ""
    return OpcompError(
        f"'{culprit.op}' cannot apply to parameter {info.describe()}{refused}: it needs "
        f"{APPLIES_NEEDS[culprit.applies]} — add a fallback for the other parameters, e.g. "
        f"'{example}', or give this parameter its own param group or rule",
        culprit.span,
    )


@dataclass
class Bucket:
    """Parameters of one group sharing program, shape, dtype and device."""

    program: Program
    params: list[Tensor] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


def bucket_key(program: Program, param: Tensor) -> tuple:
    return (program, tuple(param.shape), param.dtype, param.device)


def check_parameter(param: Tensor, name: str) -> None:
    if not isinstance(param, Tensor):
        raise OpcompTypeError(f"parameter {name} is a {type(param).__name__}, not a torch.Tensor")
    if not torch.is_floating_point(param):
        raise OpcompValueError(f"parameter {name} has dtype {param.dtype}; opcomp optimizes floating-point tensors")


def representable(graph: Graph, dtypes: set[torch.dtype]) -> None:
    """Every number option of ``graph`` as a number of the working precision ``dtypes``: an option
    that passes its bounds but is inf there (``1e39 * g`` in fp32) or rounds to 0 (``adamw[eps=1e-50]``,
    whose 0/0 writes NaN) would run something other than what was written, so it is refused."""
    for node in graph.nodes:
        for name, value in node.options:
            if isinstance(value, bool) or not isinstance(value, float) or value == 0:
                continue
            for dtype in dtypes:
                problem = unrepresentable(value, dtype)
                if problem is not None:
                    what = f"the factor {value:g}" if node.op == "scale" else f"'{node.op}' option {name}={value:g}"
                    effect = "overflow" if problem == "overflows to inf" else "divide by zero"
                    precision = str(dtype).removeprefix("torch.")
                    info = torch.finfo(dtype)
                    raise OpcompError(
                        f"{what} {problem} in {precision}, the working precision of these parameters, so the step "
                        f"would {effect}: give a magnitude between {info.tiny:g} and {info.max:g}",
                        node.span,
                    )


def unrepresentable(value: float, dtype: torch.dtype) -> str | None:
    """How a nonzero number fails to be one of ``dtype``'s: 'overflows to inf', 'rounds to 0', or None."""
    if abs(value) > torch.finfo(dtype).max:
        return "overflows to inf"
    if float(torch.tensor(value, dtype=dtype)) == 0:
        return "rounds to 0"
    return None


@dataclass
class GroupPlan:
    """A param group as built: the expression the user wrote, and its buckets."""

    written: str
    buckets: list[Bucket]


class Plan:
    """What building decides: each expression's graph, what every parameter runs, the buckets that
    run it together, and the layers whose statistics each layer node captures.

    The optimizer builds it as param groups are added and reads it at every step; the executor
    and the state's loader read it too. Nothing here changes while training.
    """

    def __init__(
        self,
        namespace=None,
        model: nn.Module | None = None,
        names: Mapping[int, str] | None = None,
        owners: Mapping[int, tuple[nn.Module, str]] | None = None,
        sampling: bool = False,
        head: nn.Module | None = None,
    ) -> None:
        self.namespace = namespace
        self.model = model
        self.names = dict(names or {})  # id(param) -> name
        self.owners = dict(owners or {})  # id(param) -> (owning module, attribute name)
        self.sampling = sampling  # a likelihood was given, so fisher=mc can sample labels
        self.tied, self.hidden_from_hooks = _tied_and_unhookable(model)
        # the output head (id): a guess until the model's first forward settles it (opcomp.head)
        head = head if head is not None else guess(model, self.hidden_from_hooks)
        self.head = None if head is None else id(head)
        self.graphs: dict[str, Graph] = {}
        self.groups: list[GroupPlan] = []
        self.infos: dict[int, ParamInfo] = {}  # id(param) -> what its program was made from
        self.layers: dict[tuple[str, int], list[Layer]] = {}  # (expression, node id) -> layers

    # -- building -----------------------------------------------------------------------------------

    def lower(self, expr: str | Expr) -> Graph:
        """The graph of an expression, checked against what this build can give it."""
        graph = lower(expr, self.namespace)
        self.graphs.setdefault(graph.canonical, graph)
        if graph.needs.model and self.model is None:
            needing = sorted({n.op for n in graph.nodes if n.spec.needs.model})
            raise OpcompError(
                f"'{needing[0]}' needs the model's layers: build with the module, "
                f"opcomp.build(expr, model), not with model.parameters()"
            )
        if graph.needs.likelihood and not self.sampling:
            raise OpcompError(
                "fisher=mc samples labels from the model's output: say how, with "
                "opcomp.build(..., likelihood='categorical') for logits or likelihood='gaussian' for ½‖f − y‖²"
            )
        return graph

    def add_group(self, graph: Graph, params: list[Tensor], written: str) -> None:
        """Plan a param group: every parameter's program, and the buckets of equal programs."""
        index = len(self.groups)
        buckets: dict[tuple, Bucket] = {}
        for position, param in enumerate(params):
            name = self.names.get(id(param), f"#{position} of param group {index}")
            check_parameter(param, name)
            module, role = self.owners.get(id(param), (None, None))
            unhookable, refused = id(module) in self.hidden_from_hooks, unsupported(module)
            kind = None if unhookable or refused else kind_of(module)
            tied, head = id(param) in self.tied, module is not None and id(module) == self.head
            info = ParamInfo(name, tuple(param.shape), module, role, kind, tied, unhookable, head, refused)
            self.infos[id(param)] = info
            program = select(graph, info, written)
            bucket = buckets.setdefault(bucket_key(program, param), Bucket(program))
            bucket.params.append(param)
            bucket.names.append(name)
        representable(graph, {working_dtype(p.dtype) for p in params})
        self.groups.append(GroupPlan(written, list(buckets.values())))

    def with_head(self, head: nn.Module, param_groups: list[dict]) -> Plan:
        """This plan made again for another output head (the model's first forward named it)."""
        plan = Plan(self.namespace, self.model, self.names, self.owners, sampling=self.sampling, head=head)
        plan.graphs = dict(self.graphs)
        for group, planned in zip(param_groups, self.groups):
            plan.add_group(self.graphs[group["expr"]], group["params"], planned.written)
        return plan

    def plan_layers(self, expressions: list[str]) -> list[nn.Module]:
        """Which layers run each layer node, per expression (one per group, in order); returns the
        modules whose statistics must be captured."""
        plans: dict[tuple[str, int], dict[nn.Module, Layer]] = defaultdict(dict)
        for expression, group in zip(expressions, self.groups):
            for bucket in group.buckets:
                for step in bucket.program.steps:
                    if step.node.spec.applies is not Applies.LAYER:
                        continue
                    for param in bucket.params:
                        info = self.infos[id(param)]
                        layers = plans[(expression, step.node.id)]
                        layer = Layer(info.module, _layer_name(info), step.node, info.kind)
                        plan = layers.setdefault(info.module, layer)
                        setattr(plan, info.role, param)
        self.layers = {key: list(layers.values()) for key, layers in plans.items()}
        return list(dict.fromkeys(layer.module for layer in self.all_layers()))

    def summed_at_capture(self) -> dict[nn.Module, Callable]:
        """The captured layers whose rows every node reads summed over positions (a Conv2d under
        kfac or diag_kfac, not ekfac), and how: the capture sums them as their gradient arrives
        (:mod:`opcomp.layers.summed`)."""
        per_example = {layer.module for layer in self.all_layers() if layer.node.spec.per_example}
        summing = {layer.module: layer.kind.summing(layer.module) for layer in self.all_layers()}
        return {module: sums for module, sums in summing.items() if sums is not None and module not in per_example}

    # -- reading --------------------------------------------------------------------------------------

    def all_layers(self) -> Iterator[Layer]:
        return (layer for layers in self.layers.values() for layer in layers)

    def buckets(self) -> Iterator[Bucket]:
        return (bucket for group in self.groups for bucket in group.buckets)

    def families(self, param_groups: list[dict]) -> dict[str, list[tuple[dict, Bucket, list[Tensor]]]]:
        """This step's work by expression: (group, bucket, its parameters that take part) — all of
        them for programs that need no gradient, the ones with a gradient otherwise."""
        families: dict[str, list] = defaultdict(list)
        for group, planned in zip(param_groups, self.groups):
            for bucket in planned.buckets:
                takes = bucket.program.reads_gradient
                params = [p for p in bucket.params if p.grad is not None or not takes]
                if params:
                    families[group["expr"]].append((group, bucket, params))
        return dict(families)

    def layers_of(self, expression: str) -> dict[int, list[Layer]]:
        """Node id -> the layers that node captures, for one expression."""
        return {node_id: layers for (e, node_id), layers in self.layers.items() if e == expression}

    def program_of(self, param: Tensor) -> Program:
        return next(b.program for b in self.buckets() if any(p is param for p in b.params))

    def arming(self, state) -> tuple[bool, bool]:
        """(record layer statistics, sample labels too) for the coming step: only when some
        layer's statistics are due, and sampling only when a due node asks for it."""
        due = [layer for layer in self.all_layers() if layer.due(state)]
        return bool(due), any(layer.node.spec.needs_for(layer.node.options).likelihood for layer in due)

    def assignments(self) -> dict[str, str]:
        """Parameter name -> the operators it runs, outermost first (``'muon ← kfac'``)."""
        return {n: b.program.describe() for b in self.buckets() for n in b.names}

    def rules(self, param_groups: list[dict]) -> dict[str, str]:
        """Parameter name -> the rule of the rule file that chose its expression."""
        return {
            n: group["rule"]
            for group, planned in zip(param_groups, self.groups)
            if "rule" in group
            for b in planned.buckets
            for n in b.names
        }

    def describe(self, param_groups: list[dict]) -> str:
        """Each group's graph and what every parameter runs (``opt.explain()``)."""
        parts = []
        runs = self.assignments()
        for index, (group, planned) in enumerate(zip(param_groups, self.groups)):
            rule = f"  ({group['rule']})" if "rule" in group else ""
            parts.append(f"param group {index}  lr={group['lr']}{rule}")
            parts.append(explain(self.graphs[group["expr"]], planned.written))
            parts.append("parameters:")
            graph = self.graphs[group["expr"]]
            rows = [(n, p) for b in planned.buckets for n, p in zip(b.names, b.params)]
            width = max((len(n) for n, _ in rows), default=0)
            for name, param in rows:
                why = "; ".join(
                    why_not(culprit, self.infos[id(param)]) for _, culprit in fallen_back(graph, self.infos[id(param)])
                )
                fell = f"  — fell back: {why}" if why else ""
                parts.append(f"  {name:<{width}}  {str(tuple(param.shape)):<16} {runs[name]}{rule}{fell}")
            parts.append("")
        return "\n".join(parts).rstrip()


def _tied_and_unhookable(model: nn.Module | None) -> tuple[set[int], set[int]]:
    """Ids of parameters that several modules hold (tied), and of modules whose forward never runs
    as their own: MultiheadAttention computes its projections, out_proj's included, inside
    F.multi_head_attention_forward, where no module hook reaches."""
    if model is None:
        return set(), set()
    holders: dict[int, int] = defaultdict(int)
    for module in model.modules():
        for _, param in module.named_parameters(recurse=False):
            holders[id(param)] += 1
    attention = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    inside = {id(m) for module in attention for m in module.modules()}
    return {p for p, count in holders.items() if count > 1}, inside


def _layer_name(info: ParamInfo) -> str:
    """The layer's name: its parameter's name without the attribute."""
    suffix = f".{info.role}"
    return info.name[: -len(suffix)] if info.name.endswith(suffix) else info.name


def new_params(params, param_groups: list[dict], names: Mapping[int, str]) -> list[Tensor]:
    """A new group's parameters, checked as torch.optim checks them (before anything is planned)."""
    number = len(param_groups)
    if isinstance(params, Tensor):
        params = [params]
    elif isinstance(params, (set, frozenset)):
        raise OpcompTypeError(f"param group {number}'s 'params' is a set; pass a list so the order is fixed")
    elif isinstance(params, (str, bytes, Mapping)) or not isinstance(params, Iterable):
        raise OpcompTypeError(
            f"param group {number}'s 'params' is a {type(params).__name__}: give a list of tensors (model.parameters())"
        )
    params = list(params)
    seen = {id(p) for group in param_groups for p in group["params"]}
    for position, param in enumerate(params):
        name = names.get(id(param), f"#{position} of param group {number}")
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
