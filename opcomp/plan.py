"""The execution plan: which nodes each parameter runs, and the buckets that run them together.

For every parameter the graph's fallbacks are resolved once, at build time: a branch applies when
every node in it does (``orth`` needs a matrix, ``kfac`` a supported layer). What remains is the
parameter's :class:`Program`. Parameters of one param group with the same program, shape, dtype
and device form a :class:`Bucket`, and each operator runs once per bucket per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from opcomp.errors import OpcompError
from opcomp.graph import Graph, Node
from opcomp.kernels.factors import Columns
from opcomp.ops import Applies

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d, nn.Embedding)
"""Exact types: a subclass may never call its own forward (MultiheadAttention's out_proj), so it falls back."""

APPLIES_NEEDS = {
    Applies.MATRIX: "a matrix (ndim >= 2)",
    Applies.LAYER: "a weight or bias of a Linear, Conv2d or Embedding layer",
}


@dataclass(frozen=True)
class ParamInfo:
    """What applicability depends on: the parameter's shape and the module that owns it."""

    name: str
    shape: tuple[int, ...]
    module: nn.Module | None = None  # the module owning the parameter, when a model was given
    role: str | None = None  # its attribute name there: 'weight', 'bias', …

    @property
    def layer(self) -> bool:
        """A weight or bias of a layer whose statistics opcomp captures."""
        return type(self.module) in SUPPORTED_LAYERS and self.role in ("weight", "bias")

    def satisfies(self, applies: Applies) -> bool:
        if applies is Applies.MATRIX:
            return len(self.shape) >= 2
        if applies is Applies.LAYER:
            return self.layer
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

    @property
    def output(self) -> int:
        return self.steps[-1].node.id

    def step_of(self, node_id: int) -> Step | None:
        return next((step for step in self.steps if step.node.id == node_id), None)

    @property
    def reads_gradient(self) -> bool:
        """Whether it needs the training backward; zeroth-order programs step without one."""
        return any(step.node.spec.reads_gradient for step in self.steps)

    def describe(self) -> str:
        ops = " ← ".join(step.node.op for step in reversed(self.steps) if step.node.op not in ("g", "p"))
        return ops + (f" (weight decay {self.decay:g})" if self.decay else "")


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
    applies: dict[int, bool] = {}
    chosen: dict[int, int] = {}
    for node in graph.nodes:
        if node.op == "fallback":
            branch = next((i for i in node.inputs if applies[i]), None)
            applies[node.id] = branch is not None
            if branch is not None:
                chosen[node.id] = branch
        else:
            applies[node.id] = info.satisfies(node.spec.applies) and all(applies[i] for i in node.inputs)
    if not applies[graph.root.id]:
        raise _refusal(info, _blame(graph, graph.root, applies, info), written)

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


def _blame(graph: Graph, node: Node, applies: dict[int, bool], info: ParamInfo) -> Node:
    """The operator that keeps ``node`` from applying to the parameter."""
    while True:
        if node.op == "fallback":
            node = graph.nodes[node.inputs[-1]]
        elif not info.satisfies(node.spec.applies):
            return node
        else:
            node = next(graph.nodes[i] for i in node.inputs if not applies[i])


def _refusal(info: ParamInfo, culprit: Node, written: str) -> OpcompError:
    example = f"{written} | adamw(g)" if len(written) <= 60 else "… | adamw(g)"
    return OpcompError(
        f"'{culprit.op}' cannot apply to parameter {info.describe()}: it needs "
        f"{APPLIES_NEEDS[culprit.spec.applies]} — add a fallback for the other parameters, e.g. "
        f"'{example}', or give this parameter its own param group or rule",
        culprit.span,
    )


@dataclass
class LayerPlan:
    """A layer running a layer node: its weight and bias, if they run the node too."""

    module: nn.Module
    name: str
    node: Node
    weight: Tensor | None = None
    bias: Tensor | None = None

    @property
    def columns(self) -> Columns:
        """What X holds: the weight, the weight with the bias folded in as a last column (the bias
        runs the node too), or the bias alone (it runs the node, the weight does not)."""
        if self.weight is None:
            return "bias"
        return "weight+bias" if self.bias is not None and not isinstance(self.module, nn.Embedding) else "weight"

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(out, in) of the layer's X: (dim, vocabulary) for an Embedding, a bias column counted."""
        weight = self.module.weight
        if isinstance(self.module, nn.Embedding):
            return weight.shape[1], weight.shape[0]
        columns = {"weight": weight[0].numel(), "weight+bias": weight[0].numel() + 1, "bias": 1}[self.columns]
        return weight.shape[0], columns

    @property
    def owner(self) -> Tensor:
        """The parameter whose state holds the layer's statistics."""
        return self.weight if self.weight is not None else self.bias

    def steps_taken(self, state) -> int:
        entry = state[self.owner].get(self.node.state_key, {}) if self.owner in state else {}
        step = entry.get("step")
        return 0 if step is None else int(step.item())


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
        raise OpcompError(f"parameter {name} is a {type(param).__name__}, not a torch.Tensor")
    if not torch.is_floating_point(param):
        raise OpcompError(f"parameter {name} has dtype {param.dtype}; opcomp optimizes floating-point tensors")
