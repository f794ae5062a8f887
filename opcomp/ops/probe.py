"""Probe operators: extra forward or backward work per step, through the closure."""

from __future__ import annotations

import sys
from typing import Literal

from pydantic import Field

from opcomp.ops.fields import Count, NonNegative, Positive
from opcomp.ops.registry import Cost, Kind, Needs, OpSpec, Options, StateBuffer, register

register(
    OpSpec(
        name="hvp",
        kind=Kind.PROBE,
        needs=Needs(closure=True, double_backward=True),
        reads_gradient=True,
        cost=Cost(backward=1, memory="the first backward's graph (create_graph)"),
        summary="Hessian-vector product by double backward",
        formula="H·x, H = ∇²L(p)",
    )
)

register(
    OpSpec(
        name="gnvp",
        kind=Kind.PROBE,
        needs=Needs(closure=True, model=True),
        cost=Cost(backward=3, memory="the loss graph and the graph of Jᵀu (create_graph)"),
        summary="Gauss–Newton-vector product on the training pass's graph (double-backward trick)",
        formula="Jᵀ H_L J x, J = ∂outputs/∂p, H_L = ∂²loss/∂outputs²",
    )
)


class SamOptions(Options):
    rho: Positive = Field(0.05, description="radius of the ascent step")
    mode: Literal["plain", "adaptive", "fisher"] = Field(
        "plain", description="ascent direction: g, T²g with T = |p| + eta (ASAM), or g⊙√v̂ (Fisher)"
    )
    eta: NonNegative = Field(0.01, description="adaptive: added to |p| in ASAM's T, so zero weights still move")


register(
    OpSpec(
        name="sam",
        scale_of=0,
        kind=Kind.PROBE,
        params=("inner",),
        options=SamOptions,
        needs=Needs(closure=True),
        binds_gradient=True,
        reads_gradient=True,
        cost=Cost(forward=1, backward=1, memory="a copy of the parameters and the probed gradient"),
        state=(
            StateBuffer(
                "grad_sq", "param", "EMA of g², only for mode=fisher when the inner keeps none", nonnegative=True
            ),
            StateBuffer("step", "scalar", "steps of that average"),
        ),
        summary="sharpness-aware minimisation around any inner optimizer",
        formula=(
            "ε = rho·d/‖d‖ (global norm), d = g (plain) or g⊙√v̂ (fisher); adaptive (ASAM): "
            "ε = rho·T²g/‖Tg‖, T = |p| + eta; the inner's direction input is g_sam = ∇L(p + ε) while its "
            "statistics keep reading the raw g"
        ),
    )
)


class LgnOptions(Options):
    solver: Literal["cg", "adam"] = Field("cg", description="inner solver of the layer's quadratic model")
    steps: Count = Field(5, description="inner solver iterations")
    damping: NonNegative = Field(1e-4, description="λ added to the layer's Gauss–Newton block")
    inner_lr: Positive = Field(0.1, description="step size of the adam inner solver")


register(
    OpSpec(
        name="lgn",
        kind=Kind.PROBE,
        options=LgnOptions,
        needs=Needs(closure=True, model=True),
        cost_when=lambda o: Cost(
            backward=1 + 2 * o.steps, memory="the loss graph and the layer's graph of Jᵀu", per_layer=True
        ),
        summary="layerwise Gauss–Newton step from matrix-free products",
        formula="per layer l: −d*, d* ≈ argmin_d xᵀd + ½dᵀ(G_l + λI)d, i.e. (G_l + λI)⁻¹x",
    )
)


def _newton_underflow(options) -> str | None:
    """newton divides by eps²: an eps whose square is below the smallest normal double divides by 0."""
    if options.newton and options.eps**2 < sys.float_info.min:
        return f"newton divides the curvature by eps² = {options.eps**2:g}, which underflows: use eps >= 1e-150"
    return None


class ZoOptions(Options):
    eps: Positive = Field(1e-3, description="perturbation size")
    dist: Literal["rademacher", "gaussian"] = Field("rademacher", description="distribution of z")
    relative: bool = Field(False, description="perturb by eps·z⊙p")
    newton: bool = Field(False, description="divide by the three-point curvature estimate")


register(
    OpSpec(
        name="zo",
        kind=Kind.PROBE,
        params=(),
        options=ZoOptions,
        state=(
            StateBuffer("step", "scalar", "steps taken: seeds the noise"),
            StateBuffer("floored", "scalar", "newton: probes whose curvature fell below the rounding floor"),
        ),
        needs=Needs(closure=True, forward_only=True),
        cost_when=lambda o: Cost(forward=3 if o.newton else 2, memory="a copy of the parameters"),
        refuses=_newton_underflow,
        summary="zeroth-order gradient estimate from loss values (SPSA)",
        formula=(
            "(L(p + eps·z) − L(p − eps·z))/(2·eps)·z, z seeded; relative: z ← z⊙p; newton: ÷ |L⁺ + L⁻ − 2L₀|/eps²"
        ),
    )
)
