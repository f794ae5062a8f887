"""Curvature products and the solvers built on them: Hessian-vector and Gauss–Newton-vector
products, and the layerwise Gauss–Newton step (``lgn``) that solves with them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from opcomp.autograd import products
from opcomp.closure import Probe, second_derivatives, zeros_like_working
from opcomp.kernels.context import ProbeCtx
from opcomp.kernels.elementwise import adam_denominator, adam_ratio, update_moments
from opcomp.kernels.table import kernel
from opcomp.ops.statistical import AdamOptions
from opcomp.precision import working


def hessian_products(probe: Probe, params: Sequence[Tensor], vectors: Sequence[Tensor]) -> list[Tensor | None]:
    """H·v per parameter by differentiating ⟨∇L, v⟩ once more (the first backward kept its graph),
    averaged over the ranks; None where the gradient does not reach a parameter."""
    reached = [(probe.graph_grads[id(p)], v.to(p.dtype)) for p, v in zip(params, vectors) if id(p) in probe.graph_grads]
    with second_derivatives():
        found = products([g for g, _ in reached], params, [v for _, v in reached], retain_graph=True, needed_by="hvp")
    return probe.reduced(found, params)


@kernel("hvp", collective="probe")
def hvp(ctx: ProbeCtx, x: list[Tensor]) -> list[Tensor]:
    """H·x."""
    found = hessian_products(ctx.probe, ctx.params, x)
    return ctx.checks([torch.zeros_like(v) if h is None else h.detach().to(v.dtype) for h, v in zip(found, x)])


class GaussNewton:
    """v ↦ Jᵀ H_L J v for a subset of the parameters, on the first evaluation's own graph.

    Jᵀu differentiates the recorded model outputs (every forward the closure ran, so an
    accumulated loss's micro-batches all count); J v differentiates Jᵀu once more with respect to
    u (the double-backward trick); H_L differentiates ∂L/∂f, cross terms between outputs included.
    Nothing is replayed: batch norms keep their training-mode statistics, caches, hooks and
    checkpointing are the training pass's own.
    """

    def __init__(self, probe: Probe, params: Sequence[Tensor]) -> None:
        probe.check_model_call()
        self.probe, self.params = probe, list(params)
        self.outputs = [call.output for call in probe.calls]
        self.duals = [torch.zeros_like(output, requires_grad=True) for output in self.outputs]
        with second_derivatives():
            self.transposed = products(
                self.outputs, self.params, self.duals, create_graph=True, retain_graph=True, needed_by="gnvp"
            )

    def __call__(self, v: Sequence[Tensor]) -> list[Tensor]:
        reached = [(t, vi.to(t.dtype)) for t, vi in zip(self.transposed, v) if t is not None]
        found: Sequence[Tensor | None] = [None] * len(v)  # no parameter here reaches the outputs: G is 0
        if reached:
            with second_derivatives():
                jvs = products(
                    [t for t, _ in reached], self.duals, [vi for _, vi in reached], retain_graph=True, needed_by="gnvp"
                )
                jvs = [torch.zeros_like(o) if jv is None else jv for jv, o in zip(jvs, self.outputs)]
                hjvs = products(self.probe.loss_gradients(), self.outputs, jvs, retain_graph=True, needed_by="gnvp")
                hjvs = [torch.zeros_like(o) if h is None else h for h, o in zip(hjvs, self.outputs)]  # H_L is 0
                found = products(self.outputs, self.params, hjvs, retain_graph=True, needed_by="gnvp")
        found = self.probe.reduced(found, self.params)  # averaged over the ranks' batches
        return [zeros_like_working(vi) if gv is None else working(gv) for gv, vi in zip(found, v)]


@kernel("gnvp", collective="probe")
def gnvp(ctx: ProbeCtx, x: list[Tensor]) -> list[Tensor]:
    return ctx.checks(GaussNewton(ctx.probe, ctx.params)(x))


@kernel("lgn", collective="probe")
def lgn(ctx: ProbeCtx, x: list[Tensor]) -> list[Tensor]:
    """Per layer, u ≈ (G_l + λI)⁻¹ x_l: the minimiser d* of xᵀd + ½dᵀ(G_l + λI)d is −u."""
    o = ctx.options
    out: list = [None] * len(x)
    solve = conjugate_gradient if o.solver == "cg" else adam_descent
    for layer in ctx.layers:
        system = damped(GaussNewton(ctx.probe, [ctx.params[i] for i in layer]), o.damping)
        for i, value in zip(layer, solve(system, [x[i] for i in layer], o)):
            out[i] = value
    return ctx.checks(out)


def damped(product: GaussNewton, damping: float):
    """v ↦ (G + λI) v."""
    return lambda v: [gv + damping * vi for gv, vi in zip(product(v), v)]


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return sum(float((u.double() * v.double()).sum()) for u, v in zip(a, b))


def conjugate_gradient(system, right: list[Tensor], options) -> list[Tensor]:
    """``steps`` iterations of CG on system(u) = right from u = 0."""
    u = [torch.zeros_like(r) for r in right]
    residual = [r.clone() for r in right]
    direction = [r.clone() for r in right]
    rho = dot(residual, residual)
    for _ in range(options.steps):
        if rho == 0.0:
            break
        applied = system(direction)
        curvature = dot(direction, applied)
        if curvature <= 0.0:
            break
        alpha = rho / curvature
        u = [ui + alpha * di for ui, di in zip(u, direction)]
        residual = [ri - alpha * ai for ri, ai in zip(residual, applied)]
        rho, previous = dot(residual, residual), rho
        direction = [ri + (rho / previous) * di for ri, di in zip(residual, direction)]
    return u


INNER_ADAM = AdamOptions()
"""The inner solver's Adam: torch's defaults, b1 = 0.9, b2 = 0.999, eps = 1e-8."""


def adam_descent(system, right: list[Tensor], options) -> list[Tensor]:
    """``steps`` Adam steps (lr ``inner_lr``) on q(d) = xᵀd + ½ dᵀ system(d) from d = 0; returns −d."""
    b1, b2, eps = INNER_ADAM.b1, INNER_ADAM.b2, INNER_ADAM.eps
    d = [torch.zeros_like(r) for r in right]
    first = [torch.zeros_like(r) for r in right]
    second = [torch.zeros_like(r) for r in right]
    for t in range(1, options.steps + 1):
        gradient = [r + sd for r, sd in zip(right, system(d))]
        update_moments(first, second, gradient, b1, b2)
        steps = [t] * len(d)
        ratio = adam_ratio(first, adam_denominator(second, steps, b2, eps), steps, b1)
        torch._foreach_sub_(d, ratio, alpha=options.inner_lr)
    return [-di for di in d]
