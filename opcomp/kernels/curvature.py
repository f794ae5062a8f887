"""Curvature products and the solvers built on them: Hessian-vector and Gauss–Newton-vector
products, and the layerwise Gauss–Newton step (``lgn``) that solves with them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.func import functional_call, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel

from opcomp.closure import Probe, finite
from opcomp.kernels import kernel
from opcomp.kernels.context import ProbeCtx
from opcomp.kernels.elementwise import adam_denominator, adam_ratio, update_moments
from opcomp.ops.statistical import AdamOptions
from opcomp.precision import working


@kernel("hvp", collective="probe")
def hvp(ctx: ProbeCtx, x: list[Tensor]) -> list[Tensor]:
    """H·x by differentiating ⟨∇L, x⟩ once more (the first backward kept its graph)."""
    grads = [ctx.probe.graph_grads[id(p)] for p in ctx.params]
    products = torch.autograd.grad(
        grads, ctx.params, [v.to(p.dtype) for v, p in zip(x, ctx.params)], retain_graph=True, allow_unused=True
    )
    return finite([torch.zeros_like(v) if h is None else h.detach().to(v.dtype) for h, v in zip(products, x)])


class GaussNewton:
    """v ↦ Jᵀ H_L J v for a subset of the parameters, with torch.func over the model's forward."""

    def __init__(self, probe: Probe, params: Sequence[Tensor]) -> None:
        probe.check_model_call()
        model = probe.model
        names = {id(p): n for n, p in model.named_parameters()}
        self.keys = [names[id(p)] for p in params]
        fixed = {n: p.detach() for n, p in model.named_parameters()}
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}  # probes never move running stats
        self.primals = tuple(p.detach() for p in params)

        def forward(*values: Tensor) -> Tensor:
            arguments = {**fixed, **dict(zip(self.keys, values)), **buffers}
            with sdpa_kernel([SDPBackend.MATH]):  # fused attention kernels have no forward-mode derivative
                return functional_call(model, arguments, probe.inputs, probe.input_kwargs)

        self.forward = forward
        self.probe = probe
        _, self.pullback = vjp(forward, *self.primals)

    def __call__(self, v: Sequence[Tensor]) -> list[Tensor]:
        tangents = tuple(t.to(p.dtype) for t, p in zip(v, self.primals))
        _, jv = jvp(self.forward, self.primals, tangents)
        (hjv,) = torch.autograd.grad(self.probe.loss_gradient(), self.probe.output, jv, retain_graph=True)
        return [working(t) for t in self.pullback(hjv)]


@kernel("gnvp", collective="probe")
def gnvp(ctx: ProbeCtx, x: list[Tensor]) -> list[Tensor]:
    return finite(GaussNewton(ctx.probe, ctx.params)(x))


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
    return finite(out)


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
