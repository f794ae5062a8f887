"""Probe kernels: Hessian and Gauss–Newton products, shifted gradients, layerwise Gauss–Newton,
zeroth-order estimates, Hutchinson diagonals, and SAM's probed gradient.

A probe kernel sees every parameter of an expression that runs its node at once (a product with
the Hessian couples them all), through :class:`ProbeCtx`. Randomness is seeded from the node's
state key and step, so a resumed run draws the same noise.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel

from opcomp.kernels import kernel
from opcomp.kernels.context import Ctx, advance
from opcomp.ops import Options
from opcomp.precision import working, working_dtype
from opcomp.probe import Probe, finite


@dataclass
class ProbeCtx:
    """A probe kernel's view: its options, the flat parameters running it, their states, the probe."""

    options: Options
    state_key: str
    params: list[Tensor]
    states: list[dict]  # this node's state dict per parameter
    probe: Probe
    grads: list[Tensor | None]  # the raw gradient per parameter (None where it was not computed)
    layers: list[list[int]]  # indices of params grouped by the module that owns them

    def tick(self) -> int:
        """Steps this node took before this one (all parameters step together); then advance."""
        return max(advance(state, param.device) for state, param in zip(self.states, self.params))

    def generator(self, step: int, device: torch.device) -> torch.Generator:
        digest = hashlib.sha256(f"{self.state_key}#{step}".encode()).digest()
        return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


# -- Hessian and Gauss–Newton products ---------------------------------------------------------


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


def adam_descent(system, right: list[Tensor], options) -> list[Tensor]:
    """``steps`` Adam steps (lr ``inner_lr``) on q(d) = xᵀd + ½ dᵀ system(d) from d = 0; returns −d."""
    d = [torch.zeros_like(r) for r in right]
    first = [torch.zeros_like(r) for r in right]
    second = [torch.zeros_like(r) for r in right]
    for t in range(1, options.steps + 1):
        gradient = [r + sd for r, sd in zip(right, system(d))]
        for di, m, v, gi in zip(d, first, second, gradient):
            m.lerp_(gi, 0.1)
            v.mul_(0.999).addcmul_(gi, gi, value=0.001)
            di.sub_(options.inner_lr * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8))
    return [-di for di in d]


# -- shifted points ------------------------------------------------------------------------------


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
    step = ctx.tick()

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
            for state, param in zip(ctx.states, ctx.params):
                advance(state, param.device, "floored")
        scale = max(curvature, floor)
        slope = slope / scale if scale > 0 else 0.0  # a loss that is exactly 0 around p: no information
    return finite([v.mul_(slope) for v in directions()])


def resolution(loss: float, dtype: torch.dtype, eps: float) -> float:
    """The smallest curvature a three-point difference of losses this large can tell from rounding."""
    return 4 * loss * torch.finfo(dtype).eps / eps**2


# -- Hutchinson diagonal -------------------------------------------------------------------------


@kernel("diag_hessian", collective="probe")
def diag_hessian(ctx: ProbeCtx, x: list[Tensor]) -> list[Tensor]:
    """x / ((v/(1−beta^k))^(power/2) + eps), v the running mean of D², D = z ⊙ Hz (z Rademacher)."""
    o = ctx.options
    step = ctx.tick()
    pairs = list(zip(ctx.states, ctx.params))
    averages = [state.setdefault("hess_sq", torch.zeros_like(p, dtype=working_dtype(p.dtype))) for state, p in pairs]
    if step % o.update_every == 0:
        z = list(noise(ctx, step, gaussian=False))
        grads = [ctx.probe.graph_grads[id(p)] for p in ctx.params]
        products = torch.autograd.grad(
            grads, ctx.params, [zi.to(p.dtype) for zi, p in zip(z, ctx.params)], retain_graph=True, allow_unused=True
        )
        estimates = finite([zi * (0 if h is None else working(h.detach())) for zi, h in zip(z, products)])
        for (state, param), average, estimate in zip(pairs, averages, estimates):
            average.mul_(o.beta).addcmul_(estimate, estimate, value=1 - o.beta)
            advance(state, param.device, "estimates")
    out = []
    for value, average, (state, _) in zip(x, averages, pairs):
        corrected = average / (1 - o.beta ** max(int(state.get("estimates", 0)), 1))
        out.append(value / (corrected.pow(o.power / 2) + o.eps))
    return out


# -- SAM ---------------------------------------------------------------------------------------


@kernel("sam")
def sam(ctx: Ctx, inner: list[Tensor]) -> list[Tensor]:
    """The inner's direction, which already read g_sam through its bound ``g``."""
    return inner


SECOND_MOMENTS = {"adam": "b2", "adamw": "b2", "adarmsuon": "b2", "rms": "beta"}
OWN_BETA = 0.999  # sam[fisher]'s own average of g² when the inner keeps none


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


def upcoming_second_moment(spec_name: str, options, state: dict, grad: Tensor) -> Tensor:
    """v̂ as the inner will hold it after this step's raw-gradient update, without changing it."""
    beta = getattr(options, SECOND_MOMENTS[spec_name])
    buffer = "square_avg" if spec_name == "rms" else "exp_avg_sq"
    previous = state.get(buffer)
    upcoming = grad.square() * (1 - beta) + (previous * beta if previous is not None else 0)
    if spec_name == "rms":
        return upcoming
    steps = int(state["step"].item()) + 1 if "step" in state else 1
    return upcoming / (1 - beta**steps)


def own_second_moment(state: dict, grad: Tensor) -> Tensor:
    average = state.setdefault("grad_sq", torch.zeros_like(grad))
    steps = advance(state, grad.device) + 1
    average.mul_(OWN_BETA).addcmul_(grad, grad, value=1 - OWN_BETA)
    return average / (1 - OWN_BETA**steps)


def probed_gradients(options, params: list[Tensor], grads: list[Tensor], moments: list, probe: Probe) -> list[Tensor]:
    """g_sam = ∇L(p + ε), ε = rho·d/‖m‖ over all the parameters (ε = 0 when m = 0)."""
    directions, measure = zip(*(ascent_direction(options, p, g, m) for p, g, m in zip(params, grads, moments)))
    return gradient_along(probe, params, list(directions), options.rho, list(measure))
