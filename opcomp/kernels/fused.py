"""torch's fused AdamW kernel, for a bucket whose whole update is AdamW.

A bucket that runs ``adamw(g)``, or ``adam(g)`` with decoupled decay peeled off its root
(``adam(g) + c * p``), steps exactly as ``torch.optim.AdamW(fused=True)`` does (scaled, as in
fog's ``0.1 * adamw``, at a scaled rate and decay), and torch's kernel makes that step in one
pass per parameter: it reads p, g, m and v once and writes p, m and v once. Run through
opcomp's own kernels the same step takes ten ``foreach`` passes eagerly (3.3 times as long), or
a compile of 20–75 s to fuse them into a graph that is no faster. Such a bucket therefore calls
``torch._fused_adamw_`` (the numbers are torch's own, bit for bit), compiled or not.

The finiteness check stays opcomp's: a device flag computed from the gradients, which the
kernel reads as its ``found_inf`` (then it changes nothing) and by which the step counters,
advanced first as torch.optim advances them, go back; nothing is read back to the host on any
device, except at a bucket's first step (:func:`~opcomp.execute.step_adamw`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from opcomp.closure import finite_flag
from opcomp.distributed import is_shard
from opcomp.graph import Node
from opcomp.kernels.context import BucketStep
from opcomp.ops import Options
from opcomp.state import NodeState, counter

DEVICES = ("cpu", "cuda")
"""Where torch's fused AdamW runs with the arguments torch.optim.AdamW(fused=True) gives it (fp32
0-d step counters on the parameters' device, a float lr). Checked bit for bit on the CPU; no GPU
has run it here yet."""


OPTIONS = {"adam": {"b1", "b2", "eps"}, "adamw": {"b1", "b2", "eps", "wd"}}
"""The options the kernel's arguments express, per operator: a node with any other (an option
added to ``adam`` later) steps through opcomp's own kernels rather than lose it here."""


def adamw_node(steps: Sequence) -> tuple[Node, float] | None:
    """The ``adam`` or ``adamw`` node of a program whose steps (each a node and the ids of its
    inputs) are ``g``, that node on it, and at most a positive ``scale`` of it (``0.1 * adamw``,
    fog's fallback), with the scale's factor (1 without one); None for any other program."""
    if len(steps) not in (2, 3):
        return None
    source, step = steps[:2]
    if source.node.op != "g" or step.node.op not in OPTIONS or step.node.scope is not None:
        return None
    if set(type(step.node.options).model_fields) != OPTIONS[step.node.op]:
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
    contiguous with gradients alike, not DTensor shards, on a device in :data:`DEVICES`."""
    if not params or is_shard(params[0]):  # a bucket's parameters are all shards or none is
        return False
    return all(
        p.dtype == torch.float32
        and p.grad is not None
        and p.grad.dtype == torch.float32
        and p.device.type in DEVICES
        and not p.grad.is_sparse
        and p.is_contiguous()
        and p.grad.is_contiguous()
        for p in params
    )


def non_finite(grads: list[Tensor]) -> Tensor:
    """1.0 when any of ``grads`` holds inf or NaN, else 0.0: the float flag the fused kernel takes.

    Over plain, contiguous fp32 tensors of one device it is torch's own check, the one
    ``GradScaler`` makes (``_amp_foreach_non_finite_check_and_unscale_`` at a scale of 1: it
    writes each value back as it was, which an expanded gradient could not take): exact, and
    faster on this CPU than the per-tensor ``aminmax`` of :func:`finite_flag` (1.7–2.8 against
    2.4–3.7 ms over 9.4M gradients), which serves every other case.
    """
    device = grads[0].device
    plain = (g.dtype == torch.float32 and g.device == device and type(g) is Tensor and g.is_contiguous() for g in grads)
    if all(plain):
        found = torch.zeros((), dtype=torch.float32, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones((), device=device))
        return found
    return (~finite_flag(grads)).to(torch.float32)


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
    wd·p) is torch's AdamW at rate lr·c and decay decay/c + wd. ``found_inf`` (a device flag,
    :func:`non_finite`) set, nothing changes: the kernel writes nothing and the counters,
    advanced first as torch.optim advances them, go back."""
    node = NodeState(bucket.states, bucket.params, state_key)
    first, second = node.buffers("exp_avg"), node.buffers("exp_avg_sq")
    steps = [counter(entry, param) for entry, param in zip(node.entries, bucket.params)]
    if found_inf is not None:
        found_inf = found_inf.to(bucket.params[0].device)
    torch._foreach_add_(steps, 1.0)
    torch._fused_adamw_(
        bucket.params,
        [p.grad for p in bucket.params],
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
