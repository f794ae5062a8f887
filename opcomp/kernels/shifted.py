"""Gradients at shifted points: ``grad_at``, and SAM's rebinding of ``g`` to the gradient at the
sharpest nearby point, ascent modes plain, adaptive (ASAM) and fisher (docs/probes.md)."""

from __future__ import annotations

import math

from torch import Tensor

from opcomp.closure import Probe
from opcomp.kernels.context import Ctx, ProbeCtx
from opcomp.kernels.curvature import dot
from opcomp.kernels.elementwise import correction
from opcomp.kernels.table import kernel, rebinding
from opcomp.precision import working

OWN_BETA = 0.999
"""sam[fisher]'s own average of g² where its inner keeps no second moment."""


def gradient_along(
    probe: Probe, params: list[Tensor], directions: list[Tensor], rho: float, measure: list[Tensor] | None = None
) -> list[Tensor]:
    """∇L(p + rho·d/‖m‖) with m = ``measure`` (d itself by default), ‖·‖ over every parameter
    given; ∇L(p) where m = 0."""
    measure = directions if measure is None else measure
    norm = math.sqrt(dot(measure, measure))
    return probe.gradient_at(params, directions, rho / norm if norm > 0 else 0.0)


@kernel("grad_at", collective="probe")
def grad_at(ctx: ProbeCtx, d: list[Tensor]) -> list[Tensor]:
    """∇L(p + rho·d/‖d‖), ‖·‖ over every parameter running the node; ∇L(p) where d = 0."""
    return gradient_along(ctx.probe, ctx.params, d, ctx.options.rho)


@kernel("sam")
def sam(ctx: Ctx, inner: list[Tensor]) -> list[Tensor]:
    """The inner's direction, which already read g_sam through its bound ``g``."""
    return inner


@rebinding("sam")
def sam_gradient(ctx: ProbeCtx) -> list[Tensor]:
    """g_sam = ∇L(p + ε), ε = rho·d/‖m‖ over the parameters whose programs read g inside sam."""
    o = ctx.options
    moments = fisher_moments(ctx) if o.mode == "fisher" else [None] * len(ctx.params)
    directions, measure = zip(*(ascent_direction(o, p, g, m) for p, g, m in zip(ctx.params, ctx.grads, moments)))
    return gradient_along(ctx.probe, ctx.params, list(directions), o.rho, list(measure))


def ascent_direction(options, param: Tensor, grad: Tensor, moment) -> tuple[Tensor, Tensor]:
    """(d, m) for one parameter, ε = rho·d/‖m‖: (g, g) plain; (g⊙√v̂, g⊙√v̂) fisher; and ASAM's
    (T²g, Tg) with T = |p| + eta, so that ‖T⁻¹ε‖ = rho (Kwon et al. 2021)."""
    if options.mode == "plain":
        return grad, grad
    if options.mode == "adaptive":
        scale = working(param.detach()).abs().add_(options.eta)
        scaled = scale * grad
        return scale * scaled, scaled
    direction = grad * moment.sqrt()
    return direction, direction


def fisher_moments(ctx: ProbeCtx) -> list[Tensor]:
    """v̂ per parameter: the inner's second moment after this step's raw update, or sam's own
    running mean of g² (bias-corrected) where the inner keeps none."""
    moments = ctx.second_moments()
    for i, (moment, grad) in enumerate(zip(moments, ctx.grads)):
        if moment is None:
            average = ctx.state.buffer(i, "grad_sq")
            steps = ctx.state.advance_one(i) + 1
            average.mul_(OWN_BETA).addcmul_(grad, grad, value=1 - OWN_BETA)
            moments[i] = average / correction(OWN_BETA, steps)
    return moments
