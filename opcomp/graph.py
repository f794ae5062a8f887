"""Canonical syntax tree -> DAG of operator nodes, one node per distinct sub-expression.

Two occurrences of the same canonical sub-expression become one node with one state: in
``0.5 * adam(g) + 0.5 * muon(adam(g))`` there is one ``adam``. The exception is the argument of
an operator that rebinds the gradient (``sam``): there ``g`` means the probed gradient, so a node
that depends on ``g`` inside ``sam`` is kept apart from its twin outside (its ``scope`` is the
``sam`` node's key). A node's ``state_key`` (key plus scope) names its optimizer state.

Checks that need the whole graph live here too: gradient-rebinding probes may not nest, and a
fallback branch that applies to every parameter must be the last one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, lru_cache

from opcomp.errors import CompositionError, OpcompError
from opcomp.lang.ast import Call, Expr, Fallback, Name, Neg, Num, Product, Sum, children
from opcomp.lang.parser import parse
from opcomp.lang.printer import Printed, render
from opcomp.lang.source import Span
from opcomp.ops import REGISTRY, Applies, Cost, Kind, Needs, OpSpec, Options
from opcomp.ops.combinators import ScaleOptions, SumOptions
from opcomp.ops.registry import NoOptions
from opcomp.resolve import canonicalize, literal


@dataclass(frozen=True)
class Node:
    """One operator application. ``inputs`` are node ids, always smaller than ``id``."""

    id: int
    op: str
    options: Options
    inputs: tuple[int, ...]
    key: str  # canonical text of the sub-expression
    scope: str | None = None  # key of the enclosing gradient-rebinding probe, if this reads its g
    span: Span | None = field(default=None, compare=False, repr=False)

    @property
    def spec(self) -> OpSpec:
        return REGISTRY[self.op]

    @property
    def kind(self) -> Kind:
        return self.spec.kind

    @property
    def applies(self) -> Applies:
        """Which parameters it acts on, with its options (``muon[hidden]`` narrows ``muon``)."""
        return self.spec.applies_for(self.options)

    @property
    def state_key(self) -> str:
        """Names this node's optimizer state; survives rebuilding with a sharing expression."""
        return self.key if self.scope is None else f"{self.key} in {self.scope}"


@dataclass(frozen=True)
class Graph:
    """The checked DAG of an expression; nodes are in dependency order, the root is last."""

    nodes: tuple[Node, ...]
    expr: Expr = field(compare=False, repr=False)

    @property
    def root(self) -> Node:
        return self.nodes[-1]

    @property
    def canonical(self) -> str:
        """The canonical text of the whole expression (``opcomp.format``)."""
        return self.root.key

    @cached_property
    def users(self) -> dict[int, tuple[int, ...]]:
        """Node id -> ids of the distinct nodes that take it as input."""
        users: dict[int, list[int]] = {n.id: [] for n in self.nodes}
        for node in self.nodes:
            for i in dict.fromkeys(node.inputs):
                users[i].append(node.id)
        return {k: tuple(v) for k, v in users.items()}

    def shared(self) -> list[Node]:
        """Nodes read by more than one other node: computed once, one state."""
        return [n for n in self.nodes if len(self.users[n.id]) > 1]

    def stateful(self) -> list[Node]:
        return [n for n in self.nodes if n.spec.state]

    @cached_property
    def needs(self) -> Needs:
        """What the whole expression asks of the training loop and of build."""
        total = Needs()
        for node in self.nodes:
            total = total | node.spec.needs_for(node.options)
        return total

    @cached_property
    def trains(self) -> bool:
        """Whether a step runs the training pass at p: every expression but those that estimate from
        loss values alone (``zo``), whose probes' forward passes are all the step needs."""
        probes = [node for node in self.nodes if node.spec.needs.closure]
        forward_only = probes and all(node.spec.needs.forward_only for node in probes)
        return not forward_only or any(node.spec.reads_gradient for node in self.nodes)

    def cost(self) -> tuple[Cost, Cost, list[str]]:
        """Passes per step: (once per step, once per layer, what is held in memory meanwhile).

        Training itself is one forward, and one backward when some node reads the gradient.
        """
        reads = any(node.spec.reads_gradient for node in self.nodes)
        fixed, per_layer, memory = Cost(forward=int(self.trains), backward=int(reads)), Cost(), []
        for node in self.nodes:
            cost = node.spec.cost_for(node.options)
            if cost.per_layer:
                per_layer = per_layer + cost
            else:
                fixed = fixed + cost
            if cost.memory:
                memory.append(f"{node.op}: {cost.memory}")
        return fixed, per_layer, memory

    def restrictions(self, node_id: int) -> frozenset[Applies]:
        """Restrictions on which parameters the sub-graph at ``node_id`` applies to; empty: all.

        Exact for operator chains (every node must apply). A fallback applies where any branch
        does; it gets its last branch's set, which is empty exactly when the fallback applies to
        every parameter. Per-parameter choice happens at build time, not here.
        """
        return self._restrictions[node_id]

    @cached_property
    def _restrictions(self) -> dict[int, frozenset[Applies]]:
        table: dict[int, frozenset[Applies]] = {}
        for node in self.nodes:
            own = frozenset() if node.applies is Applies.ANY else frozenset({node.applies})
            if node.op == "fallback":  # applies where any branch does: only the last branch can widen it
                table[node.id] = table[node.inputs[-1]]
            else:
                table[node.id] = own.union(*(table[i] for i in node.inputs))
        return table


def lower(expr: Expr | str, namespace=None) -> Graph:
    """The checked graph of an expression (text or syntax tree), equal sub-expressions shared;
    ``namespace`` holds the definitions it may use (the presets by default)."""
    if isinstance(expr, str):
        expr = parse(expr)
    elif not isinstance(expr, (Call, Fallback, Name, Neg, Num, Product, Sum)):
        raise OpcompError(f"expected an expression as text or from opcomp.parse, got {type(expr).__name__}")
    return build_graph(canonicalize(expr, namespace))


@lru_cache(maxsize=4096)
def current_state_key(saved: str) -> str:
    """The state key that ``saved``, written by this or an earlier opcomp, names today.

    Keys are canonical text, which spells out every option, so an option added later with a
    default changes the key of state saved before it (``muon[beta=0.95, …](g)`` gained
    ``coefficients=jordan``). Reading the saved text again gives today's spelling; a key that no
    longer reads (an operator since removed) stays as it was and matches nothing.
    """
    key, separator, scope = saved.partition(" in ")
    try:
        current = lower(key).canonical
        return f"{current} in {lower(scope).canonical}" if separator else current
    except OpcompError:
        return saved


def build_graph(expr: Expr) -> Graph:
    """The graph of a canonical tree (from :func:`opcomp.resolve.canonicalize`)."""
    builder = _Builder()
    builder.intern(expr, None)
    graph = Graph(tuple(builder.nodes), expr)
    _check_fallbacks(graph)
    return graph


def _parts(expr: Expr) -> tuple[OpSpec, Options, tuple[Expr, ...]]:
    """Operator, validated options and inputs of a canonical tree node."""
    if isinstance(expr, Name):
        return REGISTRY[expr.name], NoOptions(), ()
    if isinstance(expr, Call):
        spec = REGISTRY[expr.name]
        # resolve validated these options and wrote every one of them out: build, do not check again
        options = spec.options.model_construct(**{o.name: literal(o.value) for o in expr.options})
        return spec, options, expr.args
    if isinstance(expr, Product):
        return REGISTRY["scale"], ScaleOptions(c=float(expr.factors[0].value)), (expr.factors[1],)
    if isinstance(expr, Sum):
        return REGISTRY["sum"], SumOptions(ops=expr.ops), expr.terms
    if isinstance(expr, Fallback):
        return REGISTRY["fallback"], NoOptions(), expr.branches
    raise TypeError(f"not a canonical expression node: {expr!r}")


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.by_key: dict[tuple[str | None, str], Node] = {}
        self.texts: dict[int, Printed] = {}  # id(expr) -> printed, each subtree printed once

    def text(self, expr: Expr) -> Printed:
        printed = self.texts.get(id(expr))
        if printed is None:
            printed = self.texts[id(expr)] = render(expr, [self.text(k) for k in children(expr)])
        return printed

    def intern(self, expr: Expr, scope: str | None) -> Node:
        spec, options, inputs = _parts(expr)
        key = self.text(expr)[0]
        inner_scope = scope
        if spec.binds_gradient:
            if scope is not None:
                raise CompositionError(
                    f"'{spec.name}' inside another gradient-probing '{spec.name}' — "
                    "the inner one would need the gradient at a twice-shifted point; use one",
                    expr.span,
                )
            inner_scope = key
        children = [self.intern(child, inner_scope) for child in inputs]
        reads_probe = any(c.scope is not None for c in children) or (spec.name == "g" and scope is not None)
        node_scope = scope if reads_probe and not spec.binds_gradient else None
        existing = self.by_key.get((node_scope, key))
        if existing is not None:
            return existing
        node = Node(len(self.nodes), spec.name, options, tuple(c.id for c in children), key, node_scope, expr.span)
        self.nodes.append(node)
        self.by_key[(node_scope, key)] = node
        return node


def _check_fallbacks(graph: Graph) -> None:
    for node in graph.nodes:
        if node.op != "fallback":
            continue
        for branch, following in zip(node.inputs, node.inputs[1:]):
            if not graph.restrictions(branch):
                dead = graph.nodes[following]
                raise CompositionError(
                    f"the branch '{dead.key}' after '|' is never used: '{graph.nodes[branch].key}' "
                    "before it applies to every parameter — put the branch that applies to fewer "
                    "parameters first, or drop the unused one",
                    dead.span,
                )
