"""What a build does other than as written, said once at build time.

A fallback expression (``muon(kfac(g)) | adamw``) runs its first branch where that branch applies.
When that is less than half of a param group's parameters by size, the optimizer is mostly its
fallback, and the build says so with the numbers and the reasons (a layer opcomp cannot hook, a
tied embedding, 1-D parameters…), so that ``fog`` on a model it barely covers is never silently AdamW.
Likewise a layer factor kept diagonal because it exceeds ``max_dim`` (with what the dense one would
have cost), and a compiled model whose training pass a second-order expression must run eagerly.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter

from torch import nn

from opcomp.errors import OpcompWarning
from opcomp.ops import Applies
from opcomp.plan import ParamInfo, Plan, first_branch_refusal

MOST = 0.5
"""Below this share of a group's parameters (by size) the first branch is reported."""

NEEDS = {
    Applies.MATRIX: "a matrix",
    Applies.LAYER: "a layer of its own that hooks can see",
    Applies.HIDDEN: "a hidden layer's weight",
}


def coverage(plan: Plan, param_groups: list[dict]) -> list[str]:
    """One line per param group whose first branch reaches less than ``MOST`` of its parameters."""
    lines = []
    for index, (group, planned) in enumerate(zip(param_groups, plan.groups)):
        graph = plan.graphs[group["expr"]]
        if graph.root.op != "fallback":
            continue
        total = main = 0
        reasons: Counter = Counter()
        fallbacks: Counter = Counter()
        for bucket in planned.buckets:
            for param in bucket.params:
                info = plan.infos[id(param)]
                total += param.numel()
                culprit = first_branch_refusal(graph, info)
                if culprit is None:
                    main += param.numel()
                else:
                    needs = NEEDS[culprit.applies]
                    reasons[f"{why_not(culprit.applies, info)} ({culprit.op} needs {needs})"] += 1
                    fallbacks[bucket.program.describe()] += param.numel()
        if total and main / total < MOST:
            first = graph.nodes[graph.root.inputs[0]]
            rest = ", ".join(f"{count} × {reason}" for reason, count in reasons.most_common())
            lines.append(
                f"opcomp: {planned.written}: the first branch ({first.op}) runs on {main / total:.0%} of the "
                f"parameters of param group {index}; {1 - main / total:.0%} fell back to "
                f"{' / '.join(fallbacks)}: {rest} — opt.explain() lists each parameter"
            )
    return lines


def why_not(applies: Applies, info: ParamInfo) -> str:
    """Why a parameter is not one an operator applies to, in a few words."""
    owner = type(info.module).__name__ if info.module is not None else None
    if applies is Applies.MATRIX or len(info.shape) < 2:
        return f"{len(info.shape)}-D parameters"
    if applies is Applies.HIDDEN and info.head:
        return "the output head's weight"
    if applies is Applies.HIDDEN and info.kind == "embedding":
        return "embeddings"
    if info.tied:
        return "parameters tied to another module"
    if owner is None:
        return "parameters outside any module"
    if info.unhookable:
        return "parameters inside a MultiheadAttention, which projects where no hook reaches"
    if info.kind is None:
        return f"parameters of a {owner}"
    return f"{info.role} parameters of a {owner}"


def budget(plan: Plan) -> list[str]:
    """One line per layer node with factors above its ``max_dim``: which layers keep a diagonal,
    and what the dense factors would have taken."""
    lines = []
    for (_, _), layers in plan.layers.items():
        node = layers[0].node
        limit = getattr(node.options, "max_dim", None)
        if limit is None:
            continue
        over, dense_bytes = [], 0
        for layer in layers:
            out, inputs = layer.matrix_shape
            sides = [(side, size) for side, size in (("A", inputs), ("G", out)) if size > limit]
            sides = [(side, size) for side, size in sides if not (side == "A" and layer.kind == "embedding")]
            over += [f"{layer.name} {side} ({size})" for side, size in sides]
            dense_bytes += sum(4 * size * size for _, size in sides)
        if over:
            factors = "factor" if len(over) == 1 else "factors"
            lines.append(
                f"opcomp: {node.op} keeps the diagonal of {len(over)} {factors} above max_dim={limit} (dense, in "
                f"fp32, they would take {mebibytes(dense_bytes)}): {', '.join(over)} — raise "
                f"{node.op}[max_dim=...] to keep them dense"
            )
    return lines


def mebibytes(nbytes: int) -> str:
    """A size as people read it: MiB below a GiB, GiB above."""
    return f"{nbytes / 2**20:.1f} MiB" if nbytes < 2**30 else f"{nbytes / 2**30:.2f} GiB"


def compiled_twice(plan: Plan, param_groups: list[dict]) -> list[str]:
    """A line when a torch.compile'd model meets an expression that differentiates its loss twice:
    compiled graphs have no double backward, so that pass runs eagerly."""
    if plan.model is None or not any(compiled(m) for m in plan.model.modules()):
        return []
    nodes = [n for group in param_groups for n in plan.graphs[group["expr"]].nodes if n.spec.differentiates_twice]
    if not nodes:
        return []
    return [
        f"opcomp: '{nodes[0].op}' differentiates the loss twice, which torch.compile'd graphs cannot: every step "
        "runs the closure's first pass eagerly (torch.compiler.set_stance('force_eager')), so compiling this "
        "model buys nothing for this optimizer"
    ]


def compiled(module: nn.Module) -> bool:
    """``torch.compile(module)``'s wrapper, or a module compiled in place (``module.compile()``)."""
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing was compiled
    wrapped = dynamo is not None and isinstance(module, dynamo.OptimizedModule)
    return wrapped or getattr(module, "_compiled_call_impl", None) is not None


def warn_at_build(plan: Plan, param_groups: list[dict]) -> None:
    """Say each line of :func:`coverage`, :func:`budget` and :func:`compiled_twice` once, as an
    :class:`OpcompWarning`."""
    for line in coverage(plan, param_groups) + budget(plan) + compiled_twice(plan, param_groups):
        warnings.warn(line, OpcompWarning, stacklevel=4)
