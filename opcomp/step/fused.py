"""The fused AdamW route: a bucket whose whole update is AdamW steps by torch's fused kernel.

A bucket that runs ``adamw(g)``, or ``adam(g)`` with decoupled decay peeled off its root
(``adam(g) + c * p``), steps exactly as ``torch.optim.AdamW(fused=True)`` does (scaled, as in
fog's ``0.1 * adamw``, at a scaled rate and decay), and torch's kernel makes that step in one
pass per parameter: it reads p, g, m and v once and writes p, m and v once. Run through
opcomp's own kernels the same step takes ten ``foreach`` passes eagerly, or a long compile to
fuse them into a graph that is no faster. Such a bucket therefore calls ``torch._fused_adamw_``
(the numbers are torch's own, bit for bit), compiled or not. Which buckets take this route is
decided when the plan is built (:func:`route`).

The finiteness check stays opcomp's (:func:`opcomp.finite.non_finite`): a device flag which the
kernel reads as its ``found_inf`` (then it changes nothing) and by which the step counters,
advanced first as torch.optim advances them, go back; nothing is read back to the host on any
device, except at a bucket's first step (:func:`step_adamw`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from opcomp.distributed import is_shard
from opcomp.graph import Node
from opcomp.kernels.context import BucketStep
from opcomp.ops import Options
from opcomp.plan import Bucket
from opcomp.state import NodeState
from opcomp.step.update import bucket_steps

DEVICES = ("cpu", "cuda")
"""Where torch's fused AdamW runs with the arguments torch.optim.AdamW(fused=True) gives it (fp32
0-d step counters on the parameters' device, a float lr)."""


def route(bucket: Bucket) -> tuple[Node, float] | None:
    """The bucket's ``adam``/``adamw`` node and scale when it takes this route, else None."""
    found = adamw_node(bucket.program.steps)
    return found if found is not None and fusable(bucket.params) else None


def adamw_node(steps: Sequence) -> tuple[Node, float] | None:
    """The ``adam`` or ``adamw`` node of a program whose steps (each a node and the ids of its
    inputs) are ``g``, that node on it, and at most a positive ``scale`` of it (``0.1 * adamw``,
    fog's fallback), with the scale's factor (1 without one); None for any other program, and for
    a node with an option the kernel's arguments do not express (its spec's ``fused_adamw``)."""
    if len(steps) not in (2, 3):
        return None
    source, step = steps[:2]
    expressed = step.node.spec.fused_adamw
    if source.node.op != "g" or expressed is None or step.node.scope is not None:
        return None
    if set(type(step.node.options).model_fields) != expressed:
        return None
    if tuple(step.inputs) != (source.node.id,):
        return None
    if len(steps) == 2:
        return step.node, 1.0
    scale = steps[2]
    if scale.node.op != "scale" or tuple(scale.inputs) != (step.node.id,) or not scale.node.options.c > 0:
        return None
    return step.node, float(scale.node.options.c)


def fusable(params: list[Tensor]) -> bool:
    """Whether torch's kernel computes exactly opcomp's AdamW on ``params``: fp32 (half-precision
    parameters step in an fp32 working copy in opcomp, in their own precision in torch), dense and
    contiguous, not DTensor shards, on a device in :data:`DEVICES`. (A gradient always has its
    parameter's dtype and device; one that is not contiguous is made so for the kernel.)"""
    if not params or is_shard(params[0]):  # a bucket's parameters are all shards or none is
        return False
    return all(p.dtype == torch.float32 and p.device.type in DEVICES and p.is_contiguous() for p in params)


LR_REACH = 1.0
"""The largest learning rate this route steps. Torch's kernel cannot be undone, and its update is
finite for finite gradients (docs/runtime.md), but p − lr·u can still pass the largest float when
lr is huge (a corrupted checkpoint, a scheduler gone wrong): above this, the bucket steps through
its family's checked route, which skips such a step. No AdamW recipe comes near it."""


def still_fusable(params: list[Tensor], lr) -> bool:
    """Whether a bucket the plan put on this route still is fp32 on a device of :data:`DEVICES`
    (a model moved or cast after the build, ``model.to(torch.bfloat16)``, moves a bucket's
    parameters together, and such a bucket then steps through opcomp's own kernels, as if built
    so), at a learning rate within :data:`LR_REACH`."""
    return params[0].dtype == torch.float32 and params[0].device.type in DEVICES and float(lr) <= LR_REACH


def step_adamw(items: list, state: Mapping, nodes: list, found_inf: Tensor | None) -> None:
    """Items of this route, stepped by torch's fused kernel unless ``found_inf``. A step that
    would make their state (a first step) reads the flag first, so that a skipped one makes
    none, as a step decided on the host makes none."""
    fresh = any(
        node.state_key not in state.get(p, {}) for (_, _, params), (node, _) in zip(items, nodes) for p in params
    )
    if found_inf is not None and fresh and bool(found_inf):
        return
    for (group, planned, _), bucket, (node, scale) in zip(items, bucket_steps(items, state), nodes):
        decay, lr = planned.program.decay, float(group["lr"])
        fused_adamw(node.options, decay, bucket, node.state_key, lr, found_inf, scale)


def fused_adamw(
    options: Options,
    decay: float,
    bucket: BucketStep,
    state_key: str,
    lr: float,
    found_inf: Tensor | None,
    scale: float = 1.0,
) -> None:
    """One AdamW step of ``bucket`` in place, with the moments and counter a kernel of ``adam`` or
    ``adamw`` keeps under ``state_key`` (so either path continues the other's state). ``decay``
    is the program's peeled decay; with ``scale`` c the update p·(1 − lr·decay) − lr·c·(adam +
    wd·p) is torch's AdamW at rate lr·c and decay decay/c + wd. ``found_inf`` (a device flag)
    set, nothing changes: the kernel writes nothing and the counters, advanced first as
    torch.optim advances them, go back."""
    node = NodeState(bucket.states, bucket.params, state_key)
    first, second = node.buffers("exp_avg"), node.buffers("exp_avg_sq")
    steps = node.counters()
    if found_inf is not None:
        found_inf = found_inf.to(bucket.params[0].device)
    torch._foreach_add_(steps, 1.0)
    torch._fused_adamw_(
        bucket.params,
        [p.grad if p.grad.is_contiguous() else p.grad.contiguous() for p in bucket.params],
        first,
        second,
        [],
        steps,
        lr=lr * scale,
        beta1=options.b1,
        beta2=options.b2,
        weight_decay=decay / scale + getattr(options, "wd", 0.0),
        eps=options.eps,
        amsgrad=False,
        maximize=False,
        grad_scale=None,
        found_inf=found_inf,
    )
    if found_inf is not None:
        torch._foreach_sub_(steps, [found_inf] * len(steps))
