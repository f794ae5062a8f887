"""What a build does other than as written, said once at build time.

A fallback (``muon(kfac(g)) | adamw``, or one nested inside an operator, ``momentum(kfac(g) | g)``)
runs its first branch where that branch applies. When more than half of a param group's parameters
by size fall past it, the optimizer is mostly its fallback, and the build says so with the numbers
and the reasons (a layer opcomp cannot hook, a tied embedding, 1-D parameters…), so that ``fog``
on a model it barely covers is never silently AdamW. Likewise a factor kept as diagonal blocks
because it exceeds ``max_dim`` (with what the whole one would have cost), and a compiled model whose
training pass a second-order expression must run eagerly.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from torch import nn

from opcomp.errors import OpcompWarning
from opcomp.layers.shapes import FactorForm
from opcomp.ops.registry import matrix_sides
from opcomp.plan import Plan, fallen_back, why_not

MOST = 0.5
"""When more than this share of a group's parameters (by size) falls back at some ``|``, the build says so."""


@dataclass
class FallenBack:
    """The parameters of a group that fall back at one ``|``: their size, why, and what they run."""

    size: int = 0
    reasons: Counter = field(default_factory=Counter)
    runs: Counter = field(default_factory=Counter)


def coverage(plan: Plan, param_groups: list[dict]) -> list[str]:
    """One line per fallback (at the root or nested, ``momentum(kfac(g) | g)``) past which more than
    ``MOST`` of a param group's parameters fall, with the reasons."""
    lines = []
    for index, (group, planned) in enumerate(zip(param_groups, plan.groups)):
        graph = plan.graphs[group["expr"]]
        total = 0
        fallen: dict[int, FallenBack] = defaultdict(FallenBack)
        for bucket in planned.buckets:
            for param in bucket.params:
                total += param.numel()
                for fallback, culprit in fallen_back(graph, plan.infos[id(param)]):
                    record = fallen[fallback.id]
                    record.size += param.numel()
                    record.reasons[why_not(culprit, plan.infos[id(param)])] += 1
                    record.runs[bucket.program.describe()] += param.numel()
        for node_id in sorted(fallen, reverse=True):
            record = fallen[node_id]
            if not total or record.size / total <= MOST:
                continue
            first = graph.nodes[graph.nodes[node_id].inputs[0]]
            where = "" if node_id == graph.root.id else f" of the '|' inside {_user(graph, node_id)}"
            rest = ", ".join(f"{count} × {reason}" for reason, count in record.reasons.most_common())
            lines.append(
                f"opcomp: {planned.written}: the first branch ({first.op}){where} runs on "
                f"{1 - record.size / total:.0%} of the parameters of param group {index}; "
                f"{record.size / total:.0%} fell back to {' / '.join(record.runs)}: {rest} — opt.explain() lists "
                "each parameter"
            )
    return lines


def _user(graph, node_id: int) -> str:
    """The operator that reads a nested fallback (the outermost one, when several do)."""
    users = graph.users[node_id]
    return graph.nodes[max(users)].op if users else "the expression"


def budget(plan: Plan) -> list[str]:
    """One line per layer node with factors above its ``max_dim`` (the size budget): which layers
    keep them as diagonal blocks, what the blocks take and what the whole factors would have."""
    lines = []
    for (_, _), layers in plan.layers.items():
        node = layers[0].node
        limit = getattr(node.options, "max_dim", None)
        if limit is None or (getattr(node.options, "block", 0) or limit) < limit:  # blocks asked for: not a fallback
            continue
        over, whole_bytes, kept_bytes = [], 0, 0
        for layer in layers:
            groups = layer.block_shape[0]
            each = f" per group of {groups}" if groups > 1 else ""
            for name, form in zip(("A", "G"), layer.forms):
                if form.blocked:
                    over.append(f"{layer.name} {name} ({form.side}{each}: {form.describe()})")
                    whole_bytes += groups * FactorForm(form.side).nbytes()
                    kept_bytes += groups * form.nbytes()
        if over:
            factors = "factor" if len(over) == 1 else "factors"
            lines.append(
                f"opcomp: {node.op} keeps {len(over)} {factors} above max_dim={limit} as diagonal blocks of "
                f"{limit} × {limit}, nothing kept between blocks ({readable_bytes(kept_bytes)} in fp32; whole, they "
                f"would take {readable_bytes(whole_bytes)}): {', '.join(over)} — raise {node.op}[max_dim=...] to keep "
                f"them whole, or set {node.op}[block=...] to choose the blocks"
            )
    return lines


def factor_budget(plan: Plan) -> list[str]:
    """One line per node that keeps factors of parameters' matrix views (its spec's
    ``factor_block``) with sides over that block: which parameters keep them as diagonal blocks,
    what the blocks take and what whole factors would have."""
    over: dict[str, tuple[int, list[str], list[int]]] = {}
    for bucket in plan.buckets():
        sides = matrix_sides(tuple(bucket.params[0].shape)) or ()
        for step in bucket.program.steps:
            spec = step.node.spec
            if spec.factor_block is None:
                continue
            block = spec.factor_block(step.node.options)
            forms = [FactorForm.within(side, block) for side in sides if side > block]
            if not forms:
                continue
            _, names, sizes = over.setdefault(step.node.op, (block, [], [0, 0]))
            for name in bucket.names:
                names += [f"{name} ({form.side}: {form.describe()})" for form in forms]
                sizes[0] += sum(form.nbytes() for form in forms)
                sizes[1] += sum(FactorForm(form.side).nbytes() for form in forms)
    return [
        f"opcomp: {op} keeps {len(names)} {'factor' if len(names) == 1 else 'factors'} of sides over "
        f"max_dim={block} as diagonal blocks of {block} × {block}, nothing kept between blocks "
        f"({readable_bytes(kept)} in fp32, their roots as much again; whole, they would take "
        f"{readable_bytes(whole)}): {', '.join(names)} — raise {op}[max_dim=...] to keep them whole"
        for op, (block, names, (kept, whole)) in over.items()
    ]


def readable_bytes(nbytes: int) -> str:
    """A size as people read it: bytes, KiB, MiB below a GiB, GiB above."""
    if nbytes < 2**10:
        return f"{nbytes} B"
    if nbytes < 2**20:
        return f"{nbytes / 2**10:.1f} KiB"
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
    """Say each line of :func:`coverage`, :func:`budget`, :func:`factor_budget` and
    :func:`compiled_twice` once, as an :class:`OpcompWarning`."""
    lines = coverage(plan, param_groups) + budget(plan) + factor_budget(plan)
    for line in lines + compiled_twice(plan, param_groups):
        warnings.warn(line, OpcompWarning, stacklevel=4)
