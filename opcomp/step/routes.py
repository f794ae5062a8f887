"""Which route each bucket's step takes, decided once when the plan is built.

- *fused*: a bucket whose whole update is AdamW, on torch's fused kernel (:mod:`opcomp.step.fused`);
- *in place*: a family (the groups that share an expression) with no layer statistics, probes or
  rebound gradients steps in place, compiled (:mod:`opcomp.step.compiled`) or eagerly
  (:mod:`opcomp.step.eager`);
- *transactional*: any other family computes its updates out of place and lands them once the
  whole step is known to be finite (:mod:`opcomp.step.transactional`).

At each step :meth:`Routes.split` only sorts the buckets that take part (those with gradients),
and sends a fused bucket whose parameters were cast or moved since the build through its family's
route instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from opcomp.graph import Graph, Node
from opcomp.kernels import COLLECTIVE
from opcomp.plan import Plan
from opcomp.step.fused import route as fused_route
from opcomp.step.fused import still_fusable


def runs_in_place(graph: Graph, programs) -> bool:
    """Programs with no layer statistics, probes or rebound gradients: they step in place, in one function."""
    if any(node.spec.binds_gradient for node in graph.nodes):
        return False
    return not any(COLLECTIVE.get(s.node.op) in ("layers", "probe") or s.node.scope for p in programs for s in p.steps)


@dataclass
class Parts:
    """One step's participating items (group, bucket, parameters) sorted by route."""

    fused: list = field(default_factory=list)
    nodes: list[tuple[Node, float]] = field(default_factory=list)  # each fused item's adam node and scale
    in_place: dict[str, list] = field(default_factory=dict)  # expression -> items
    transactional: dict[str, list] = field(default_factory=dict)


@dataclass
class Routes:
    """The routes of a plan: fused buckets (by id), the expressions whose families step in place,
    and the state keys of nodes that replace their tensors (a snapshot shares those)."""

    fused: dict[int, tuple[Node, float]]
    in_place: set[str]
    replaced: frozenset[str] = frozenset()

    @classmethod
    def of(cls, plan: Plan, expressions: list[str]) -> Routes:
        fused = {id(b): found for b in plan.buckets() if (found := fused_route(b)) is not None}
        programs: dict[str, list] = {}
        for expression, group in zip(expressions, plan.groups):
            programs.setdefault(expression, []).extend(b.program for b in group.buckets if id(b) not in fused)
        in_place = {e for e, found in programs.items() if runs_in_place(plan.graphs[e], found)}
        graphs = plan.graphs.values()
        replaced = frozenset(n.state_key for graph in graphs for n in graph.nodes if n.spec.replaces_state)
        return cls(fused, in_place, replaced)

    def split(self, families: dict[str, list]) -> Parts:
        parts = Parts()
        for expression, items in families.items():
            rest = []
            for item in items:
                node = self.fused.get(id(item[1]))
                if node is None or not still_fusable(item[2], item[0]["lr"]):
                    rest.append(item)
                else:
                    parts.fused.append(item)
                    parts.nodes.append(node)
            if rest:
                (parts.in_place if expression in self.in_place else parts.transactional)[expression] = rest
        return parts
