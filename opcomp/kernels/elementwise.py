"""Element-wise kernels, each a few ``torch._foreach_*`` calls over the bucket.

Formulas are docs/operators.md's; the moment updates follow torch.optim's own op order (``lerp_`` for
first moments, ``mul_().addcmul_()`` for second moments) so results match it closely.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from opcomp.kernels.context import Ctx
from opcomp.kernels.table import kernel
from opcomp.ops import SecondMoment
from opcomp.state import taken


@kernel("g")
def gradient(ctx: Ctx) -> list[Tensor]:
    """The gradient; inside sam, the gradient at sam's probed point."""
    return ctx.bucket.probed[ctx.scope] if ctx.scope is not None else ctx.bucket.grads


@kernel("p")
def parameter(ctx: Ctx) -> list[Tensor]:
    return ctx.bucket.working_params


@kernel("scale")
def scale(ctx: Ctx, x: list[Tensor]) -> list[Tensor]:
    return torch._foreach_mul(x, ctx.options.c)


@kernel("sum")
def total(ctx: Ctx, *terms: list[Tensor]) -> list[Tensor]:
    out = (
        torch._foreach_add(terms[0], terms[1]) if ctx.options.ops[0] == "+" else torch._foreach_sub(terms[0], terms[1])
    )
    for op, term in zip(ctx.options.ops[1:], terms[2:]):
        (torch._foreach_add_ if op == "+" else torch._foreach_sub_)(out, term)
    return out


@kernel("sign")
def sign(ctx: Ctx, x: list[Tensor]) -> list[Tensor]:
    return torch._foreach_sign(x)


@kernel("ema")
def ema(ctx: Ctx, x: list[Tensor]) -> list[Tensor]:
    beta = ctx.options.beta
    average = ctx.buffers("ema")
    steps = ctx.tick()
    torch._foreach_lerp_(average, x, 1.0 - beta)
    if not ctx.options.debias:
        return average
    return torch._foreach_div(average, corrections(beta, steps))


@kernel("momentum")
def momentum(ctx: Ctx, x: list[Tensor]) -> list[Tensor]:
    """torch.optim.SGD: the buffer starts as the first input, then b ← beta·b + (1−dampening)·x."""
    o = ctx.options
    buffers, fresh = ctx.node_state.started("momentum_buffer", x)
    old = [i for i, new in enumerate(fresh) if not new]
    if old:
        running = [buffers[i] for i in old]
        torch._foreach_mul_(running, o.beta)
        torch._foreach_add_(running, [x[i] for i in old], alpha=1.0 - o.dampening)
    if o.nesterov:
        return torch._foreach_add(x, buffers, alpha=o.beta)
    return buffers


@kernel("lion")
def lion(ctx: Ctx, x: list[Tensor]) -> list[Tensor]:
    """sign(b1·m + (1−b1)·x), then m ← b2·m + (1−b2)·x; decoupled decay wd·p added."""
    o = ctx.options
    momentum = ctx.buffers("exp_avg")
    direction = torch._foreach_lerp(momentum, x, 1.0 - o.b1)
    torch._foreach_sign_(direction)
    torch._foreach_lerp_(momentum, x, 1.0 - o.b2)
    if o.wd:
        torch._foreach_add_(direction, ctx.bucket.working_params, alpha=o.wd)
    return direction


def correction(beta: float, step: Tensor | float) -> Tensor | float:
    """1 − β^t without cancellation, as −expm1(t·log β): a tensor for a counter tensor, a float for a count.

    Written naively, 1 − 0.999^t loses about 1e-5 of its value in fp32 (torch computes it in
    double); in double, a compiled step would evaluate it once per element. This form is exact to
    ~1e-7 in fp32 and cheap to inline. β = 0 gives log β = −∞ and a correction of 1, as it should.
    """
    log = math.log(beta) if beta > 0 else -math.inf
    if isinstance(step, Tensor):
        return -torch.expm1(step * log)
    return -math.expm1(step * log) if beta > 0 else 1.0


def corrections(beta: float, steps: list, root: bool = False) -> list:
    """:func:`correction` for each of a bucket's counters (its square root when ``root``), all in
    one op, ``opcomp::corrections``.

    The op keeps a compiled step from inlining the corrections: inductor would evaluate two scalar
    expm1 and a square root for each vector of 16 elements of every parameter, since the counter
    it reads may alias what the loop writes. Compiled AdamW over 9.4M parameters stepped in
    16.0 ms that way and in 9.4 ms with the op (``opcomp bench step``, docs/performance.md).
    Eagerly it replaces three tiny ops per counter with five per bucket.
    """
    if steps and isinstance(steps[0], Tensor):
        log = math.log(beta) if beta > 0 else -math.inf
        return list(torch.ops.opcomp.corrections(steps, log, root).unbind())
    values = [correction(beta, t) for t in steps]
    return [math.sqrt(v) for v in values] if root else values


torch.library.define("opcomp::corrections", "(Tensor[] steps, float log, bool root) -> Tensor")


@torch.library.impl("opcomp::corrections", "CompositeExplicitAutograd")
def _corrections(steps: list[Tensor], log: float, root: bool) -> Tensor:
    """−expm1(t·log) for counters t of one device and dtype, stacked (element for element what
    :func:`correction` gives), square-rooted when ``root``. An op of its own, opaque to inductor,
    which therefore computes it once per step rather than inline in every parameter's loop."""
    values = torch.stack(steps).mul_(log).expm1_().neg_()
    return values.sqrt_() if root else values


@torch.library.register_fake("opcomp::corrections")
def _(steps: list[Tensor], log: float, root: bool) -> Tensor:
    return steps[0].new_empty((len(steps),))


# -- Adam's formula, the one place it is written ---------------------------------------------------


def update_moments(first: list[Tensor], second: list[Tensor], x: list[Tensor], b1: float, b2: float) -> None:
    """torch.optim.Adam's moment updates, in place and in its op order: m ← m + (1−b1)(x − m),
    v ← b2·v + (1−b2)·x²."""
    torch._foreach_lerp_(first, x, 1.0 - b1)
    torch._foreach_mul_(second, b2)
    torch._foreach_addcmul_(second, x, x, 1.0 - b2)


def adam_denominator(second: list[Tensor], steps: list, b2: float, eps: float) -> list[Tensor]:
    """√v̂ + eps with v̂ = v/(1 − b2^t), computed as √v/√(1 − b2^t) + eps, torch's order."""
    denominator = torch._foreach_sqrt(second)
    torch._foreach_div_(denominator, corrections(b2, steps, root=True))
    torch._foreach_add_(denominator, eps)
    return denominator


def adam_ratio(first: list[Tensor], denominator: list[Tensor], steps: list, b1: float) -> list[Tensor]:
    """m̂/(√v̂ + eps), m̂ = m/(1 − b1^t)."""
    direction = torch._foreach_div(first, denominator)
    torch._foreach_div_(direction, corrections(b1, steps))
    return direction


def upcoming_second_moment(declared: SecondMoment, options, entry: dict, grad: Tensor) -> Tensor:
    """v̂ as a node that declares this second moment will hold it after this step's update with
    ``grad``, without changing it (what sam[fisher] weighs its ascent by)."""
    beta = getattr(options, declared.beta)
    previous = entry.get(declared.buffer)
    upcoming = grad.square() * (1.0 - beta) + (previous * beta if previous is not None else 0.0)
    if not declared.debiased:
        return upcoming
    return upcoming / correction(beta, taken(entry) + 1)


def adam_direction(ctx: Ctx, x: list[Tensor], b1: float, b2: float, eps: float) -> list[Tensor]:
    """m̂/(√v̂ + eps) with torch.optim.Adam's moment updates; the moments live in ctx's state.

    Inside sam (FS-AdaRMSuon, docs/probes.md) both moments keep reading the raw gradient and the
    probed input replaces m̂ as the numerator: x/(√v̂ + eps), and 0 where v̂ = 0 — a raw gradient
    that was exactly zero at every step (an unused weight, a bf16 gradient rounded to zero) gives
    no scale, and dividing by eps alone would move that weight by lr·x/eps.
    """
    exp_avg, exp_avg_sq = ctx.buffers("exp_avg"), ctx.buffers("exp_avg_sq")
    steps = ctx.tick()
    update_moments(exp_avg, exp_avg_sq, ctx.bucket.grads if ctx.scope is not None else x, b1, b2)
    denominator = adam_denominator(exp_avg_sq, steps, b2, eps)
    if ctx.scope is not None:
        return [torch.where(v > 0, value / d, 0.0) for value, v, d in zip(x, exp_avg_sq, denominator)]
    return adam_ratio(exp_avg, denominator, steps, b1)


@kernel("adam")
def adam(ctx: Ctx, x: list[Tensor]) -> list[Tensor]:
    o = ctx.options
    return adam_direction(ctx, x, o.b1, o.b2, o.eps)


@kernel("adamw")
def adamw(ctx: Ctx, x: list[Tensor]) -> list[Tensor]:
    o = ctx.options
    direction = adam_direction(ctx, x, o.b1, o.b2, o.eps)
    if o.wd:
        torch._foreach_add_(direction, ctx.bucket.working_params, alpha=o.wd)
    return direction


def second_moment(ctx: Ctx, name: str, of: list[Tensor], beta: float) -> list[Tensor]:
    """v ← beta·v + (1−beta)·of², kept in buffer ``name``."""
    average = ctx.buffers(name)
    torch._foreach_mul_(average, beta)
    torch._foreach_addcmul_(average, of, of, 1.0 - beta)
    return average


@kernel("rms")
def rms(ctx: Ctx, x: list[Tensor]) -> list[Tensor]:
    """x/(√v + eps); inside sam, v keeps reading the raw gradient."""
    o = ctx.options
    source = ctx.bucket.grads if ctx.scope is not None else x
    denominator = torch._foreach_sqrt(second_moment(ctx, "square_avg", source, o.beta))
    torch._foreach_add_(denominator, o.eps)
    return torch._foreach_div(x, denominator)


@kernel("diag_fisher")
def diag_fisher(ctx: Ctx, x: list[Tensor]) -> list[Tensor]:
    """x / (ema(g²) + eps): the statistic reads the raw gradient whatever x is."""
    o = ctx.options
    denominator = torch._foreach_add(second_moment(ctx, "fisher_diag", ctx.bucket.grads, o.beta), o.eps)
    return torch._foreach_div(x, denominator)
