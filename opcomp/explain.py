"""Describe a graph for a person: nodes, options against their defaults, sharing, needs."""

from __future__ import annotations

from opcomp.graph import Graph, Node
from opcomp.lang.printer import to_source
from opcomp.ops import Applies
from opcomp.resolve import option_expr

APPLIES_TEXT = {
    Applies.MATRIX: "matrices (ndim >= 2)",
    Applies.LAYER: "weights and biases of Linear, Conv1D, Conv2d and Embedding layers",
    Applies.HIDDEN: "weights of hidden Linear, Conv1D and Conv2d layers (not embeddings or the output head)",
}


def value_text(value) -> str:
    return to_source(option_expr(value)) if isinstance(value, (int, float, bool, str)) else str(value)


def options_text(node: Node) -> str:
    """``name=value`` for every option; a value that differs from the default names the default."""
    if node.op in ("sum", "fallback"):
        return ""
    parts = []
    for name, spec_field in sorted(node.spec.option_fields().items()):
        value = getattr(node.options, name)
        text = f"{name}={value_text(value)}"
        if spec_field.default is not None and not spec_field.is_required() and value != spec_field.default:
            text += f" (default {value_text(spec_field.default)})"
        parts.append(text)
    return "  ".join(parts)


def applies_text(graph: Graph, node_id: int) -> str:
    restrictions = graph.restrictions(node_id)
    if not restrictions:
        return "every parameter"
    return " that are also ".join(APPLIES_TEXT[r] for r in sorted(restrictions, key=lambda r: r.value))


def explain(graph: Graph, written: str | None = None) -> str:
    lines = []
    if written is not None:
        lines.append(f"expression  {written}")
    lines.append(f"canonical   {graph.canonical}")
    lines.append("")
    lines.append("nodes, inputs first:")
    width = max(len(n.op) for n in graph.nodes)
    shared = {n.id for n in graph.shared()}
    for node in graph.nodes:
        head = f"  #{node.id:<3} {node.op:<{width}}  {node.kind.value:<11}  {node.spec.summary}"
        lines.append(head)
        details = []
        opts = options_text(node)
        if opts:
            details.append(opts)
        if node.inputs:
            details.append("inputs " + ", ".join(f"#{i}" for i in node.inputs))
        if node.applies is not Applies.ANY:
            details.append("applies to " + APPLIES_TEXT[node.applies])
        if node.spec.state:
            details.append("state " + ", ".join(b.name for b in node.spec.state))
        if node.scope is not None:
            details.append("reads the probed gradient of its sam")
        if node.id in shared:
            users = ", ".join(f"#{u}" for u in graph.users[node.id])
            once = "computed once, one state" if node.spec.state else "computed once"
            details.append(f"shared by {users} ({once})")
        pad = " " * (7 + width + 2)
        lines.extend(pad + d for d in details)
    lines.append("")
    lines.append("shared      " + (", ".join(f"#{n.id} {n.op}" for n in graph.shared()) or "none"))
    root = graph.root
    if root.op == "fallback":
        for index, branch in enumerate(root.inputs, 1):
            lines.append(f"branch {index}    {applies_text(graph, branch)}: #{branch} {graph.nodes[branch].op}")
    else:
        lines.append("applies to  " + applies_text(graph, root.id))
    needs = graph.needs.describe()
    lines.append("needs       " + ("; ".join(needs) if needs else "nothing beyond loss.backward(); opt.step()"))
    lines.append("cost        " + cost_text(graph))
    return "\n".join(lines)


def passes(cost) -> str:
    def count(n: float, what: str) -> str:
        n = int(n) if float(n).is_integer() else n
        return f"{n} {what}{'' if n == 1 else 'es'}"

    return f"{count(cost.forward, 'forward pass')}, {count(cost.backward, 'backward pass')}"


def cost_text(graph: Graph) -> str:
    """Passes per step and what is held meanwhile, e.g. '2 forward passes, 2 backward passes'."""
    fixed, per_layer, memory = graph.cost()
    text = passes(fixed) + " per step"
    if per_layer.forward or per_layer.backward:
        text += f", plus {passes(per_layer)} per layer"
    if memory:
        text += "; holds " + "; ".join(memory)
    return text
