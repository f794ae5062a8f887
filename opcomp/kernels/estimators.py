"""Estimators from random probes: zeroth-order gradients from loss values (``zo``, SPSA with an
optional three-point Newton scale) and Hutchinson's Hessian diagonal (``diag_hessian``).

Randomness is seeded from the node's state key and step, so a resumed run draws the same noise.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from opcomp.kernels.context import ProbeCtx
from opcomp.kernels.curvature import hessian_products
from opcomp.kernels.elementwise import correction
from opcomp.kernels.table import kernel
from opcomp.precision import working, working_dtype
from opcomp.state import taken


def rademacher(shape, generator: torch.Generator, device, dtype: torch.dtype) -> Tensor:
    """±1 drawn straight into ``dtype``: no int64 draw of eight bytes per element beside it."""
    return torch.randint(0, 2, shape, generator=generator, device=device, dtype=dtype).mul_(2).sub_(1)


def noise(ctx: ProbeCtx, step: int, gaussian: bool) -> Iterator[Tensor]:
    """The step's z, one tensor per parameter, drawn in order from the step's seed: drawing again
    gives the same z, so it never needs to be kept."""
    generator = ctx.generator(step, ctx.params[0].device)
    for p in ctx.params:
        dtype = working_dtype(p.dtype)
        if gaussian:
            yield torch.randn(p.shape, generator=generator, device=p.device, dtype=dtype)
        else:
            yield rademacher(p.shape, generator, p.device, dtype)


@kernel("zo", collective="probe")
def zo(ctx: ProbeCtx) -> list[Tensor]:
    """Two-point SPSA: s = (L(p + Δ) − L(p − Δ))/(2 eps), Δ = eps·z (relative: eps·z⊙p); returns s·z
    (relative: s·z⊙p, the gradient in log-parameter coordinates). newton divides s by the
    curvature along Δ, |L⁺ + L⁻ − 2L₀|/eps², floored at ten times what the losses' rounding
    leaves resolvable (below that the three-point difference is noise).

    Forward passes only, without a graph: two, and a third at p for newton. The noise is drawn
    again from its seed for each use instead of being kept.
    """
    o = ctx.options
    step = ctx.advance()

    def directions() -> Iterator[Tensor]:
        for z, p in zip(noise(ctx, step, o.dist == "gaussian"), ctx.params):
            yield z.mul_(working(p.detach())) if o.relative else z

    centre = ctx.probe.centre() if o.newton else None  # first: without a training pass, it is one
    plus = ctx.probe.loss_at(ctx.params, directions(), o.eps)
    minus = ctx.probe.loss_at(ctx.params, directions(), -o.eps)
    slope = (plus - minus) / (2 * o.eps)
    if centre is not None:
        curvature = abs(plus + minus - 2 * float(centre)) / o.eps**2
        floor = 10 * resolution(max(abs(plus), abs(minus), abs(float(centre))), centre.dtype, o.eps)
        if curvature < floor:
            ctx.state.advance("floored")
        scale = max(curvature, floor)
        slope = slope / scale if scale > 0 else 0.0  # a loss that is exactly 0 around p: no information
    return ctx.checks([v.mul_(slope) for v in directions()])


def resolution(loss: float, dtype: torch.dtype, eps: float) -> float:
    """The smallest curvature a three-point difference of losses this large can tell from rounding."""
    return 4 * loss * torch.finfo(dtype).eps / eps**2


@kernel("diag_hessian", collective="probe")
def diag_hessian(ctx: ProbeCtx, x: list[Tensor]) -> list[Tensor]:
    """x / ((v/(1−beta^k))^(power/2) + eps), v the running mean of D², D = z ⊙ Hz (z Rademacher)."""
    o = ctx.options
    step = ctx.advance()
    averages = ctx.state.buffers("hess_sq")
    if step % o.update_every == 0:
        z = list(noise(ctx, step, gaussian=False))
        products = hessian_products(ctx.probe, ctx.params, z)
        estimates = ctx.checks([zi * (0 if h is None else working(h.detach())) for zi, h in zip(z, products)])
        for average, estimate in zip(averages, estimates):
            average.mul_(o.beta).addcmul_(estimate, estimate, value=1 - o.beta)
        ctx.state.advance("estimates")
    out = []
    for value, average, entry in zip(x, averages, ctx.state.entries):
        corrected = average / correction(o.beta, max(taken(entry, "estimates"), 1))
        out.append(value / (corrected.pow(o.power / 2) + o.eps))
    return out
