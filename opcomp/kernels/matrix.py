"""Matrix kernels: Newton–Schulz orthogonalisation, batched over a bucket's stacked matrices.

The iteration runs in bfloat16, as in the public reference Muon and torch.optim.Muon; the batched
form (``baddbmm``) reproduces torch.optim.Muon's per-matrix ``addmm`` bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from opcomp.distributed import DataParallel, gathered, sharded_like
from opcomp.kernels.context import Ctx
from opcomp.kernels.elementwise import adam_direction
from opcomp.kernels.reductions import unstack
from opcomp.kernels.table import kernel
from opcomp.ops.structural import Coefficients

COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NORM_EPS = 1e-7

ITERATION = torch.bfloat16
"""The precision the iteration runs in. tests/ddp_cases.py sets float32 around the runs it compares
with one process: bfloat16 can round a difference at float32's rounding (a batch summed in another
order) into a visible one, which an ill-conditioned step then grows."""

POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
"""Amsel, Persson, Musco & Gower (2025), arXiv:2505.16932: the minimax-optimal quintic of each
step for 5 steps (safety factor 2e-2, cushion 2); later steps repeat the last."""
POLAR_EXPRESS_SAFETY = 1.02
"""The Frobenius norm is inflated by this before the iteration, so bfloat16 rounding never lifts
a singular value above the interval the polynomials were fitted on."""


def schedule(coefficients: Coefficients, steps: int) -> list[tuple[float, float, float]]:
    """(a, b, c) of each step: Jordan's fixed quintic, or Polar Express's per-step optimal ones."""
    if coefficients == "jordan":
        return [COEFFICIENTS] * steps
    return [POLAR_EXPRESS[min(i, len(POLAR_EXPRESS) - 1)] for i in range(steps)]


def newton_schulz(matrices: Tensor, steps: int, coefficients: Coefficients = "jordan", gram: bool = False) -> Tensor:
    """Approximate polar factors of a (n, rows, cols) batch; returns them in :data:`ITERATION`'s
    precision (bfloat16), of the same shape.

    One batched iteration (``baddbmm``) on accelerators; on the CPU a loop of ``addmm`` per
    matrix, which this CPU's bfloat16 kernels run faster than the batched form (docs/performance.md).
    With ``gram``, matrices at least :data:`GRAM_MIN_ASPECT` times wider than tall (and not tiny:
    :data:`GRAM_MIN_ROWS`) iterate on their Gram matrix instead (:func:`gram_iterate`).
    """
    x = matrices.to(ITERATION)
    if x.numel() == 0:  # an empty matrix is its own polar factor
        return x
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    inflate = POLAR_EXPRESS_SAFETY if coefficients == "polar_express" else 1.0
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * inflate + NORM_EPS)
    steps_abc = schedule(coefficients, steps)
    rows, cols = x.shape[-2:]
    run = gram_iterate if gram and rows >= GRAM_MIN_ROWS and cols >= GRAM_MIN_ASPECT * rows else iterate
    if x.device.type == "cpu":
        x = torch.stack([run(m, steps_abc) for m in x.unbind(0)])
    else:
        x = run(x, steps_abc)
    return x.mT if tall else x


def iterate(x: Tensor, steps: list[tuple[float, float, float]]) -> Tensor:
    """The quintic iteration on wide matrices, as torch.optim.Muon writes it: X ← aX + (bA + cA²)X
    with A = XXᵀ, which costs 2·rows²·cols + rows³ a step."""
    for a, b, c in steps:
        gram = x @ x.mT
        update = _fma(gram, gram, gram, beta=b, alpha=c)
        x = _fma(x, update, x, beta=a)
    return x


GRAM_MIN_ASPECT = 2.0
"""``gram`` iterates on matrices at least this many times wider than tall: there it takes fewer
products (at 5 steps 6α + 11 against 10α + 5 times rows³, α = cols/rows) and ran 0.78–0.92× the
time of :func:`iterate` on this CPU (``python -m opcomp.bench.polar``, docs/performance.md)."""
GRAM_MIN_ROWS = 16
"""Nor on matrices with fewer rows: those save nothing measurable, and rounding weighs more in
them (2 × 6 drifted 22% from :func:`iterate`; 8–128 rows stayed within 7.4% over 600 draws)."""
GRAM_PERIOD = 2
"""Steps between the Gram iteration's restarts from the matrix itself."""


def gram_iterate(x: Tensor, steps: list[tuple[float, float, float]]) -> Tensor:
    """Gram Newton–Schulz (Dao lab, 2026): the same quintic, kept on rows × rows matrices.

    Every iterate is X_k = Q_k X_0 with Q_k a polynomial in R_0 = X_0X_0ᵀ, so a step is
    Z = aI + bR + cR², Q ← ZQ, R ← ZRZ, and X is formed once at the end: the wide products happen
    only there and at the restarts. Rounding lets R drift from Q R_0 Qᵀ in bfloat16, and
    errors in Q are not corrected by later steps as X's are in :func:`iterate`; restarting (X
    formed, R recomputed from it) every :data:`GRAM_PERIOD` steps bounds the drift. With Jordan's
    quintic the result then stays within 7.5% of :func:`iterate`'s (500 draws of condition ≤ 10,
    tests/test_kernel_laws.py), in the same singular value band; Polar Express's first step
    (a = 8.16) amplifies the drift until it diverges, so ``gram`` refuses those coefficients.
    """
    q = None
    r = x @ x.mT
    for i, (a, b, c) in enumerate(steps):
        if i and i % GRAM_PERIOD == 0:
            x, q = q @ x, None
            r = x @ x.mT
        z = _fma(r, r, r, beta=b, alpha=c)
        z.diagonal(dim1=-2, dim2=-1).add_(a)
        q = z if q is None else z @ q
        if i + 1 < len(steps) and (i + 1) % GRAM_PERIOD:
            r = z @ (r @ z)
    return q @ x


def _fma(input: Tensor, left: Tensor, right: Tensor, beta: float, alpha: float = 1.0) -> Tensor:  # noqa: A002
    """beta·input + alpha·left @ right, for one matrix (``addmm``) or a batch (``baddbmm``)."""
    if input.ndim == 2:
        return torch.addmm(input, left, right, beta=beta, alpha=alpha)
    return torch.baddbmm(input, left, right, beta=beta, alpha=alpha)


def as_matrices(values: list[Tensor]) -> Tensor:
    """The bucket stacked as (n, rows, rest): each parameter viewed as (rows, −1), empty ones too."""
    first = values[0]
    return torch.stack(values).reshape(len(values), first.shape[0], math.prod(first.shape[1:]))


def orthogonalise(values: list[Tensor], options, parallel: DataParallel | None = None) -> list[Tensor]:
    """orth of each value (``options``: steps, coefficients), as tensors of the values' shape and
    dtype; FSDP2's shards orthogonalised as the whole matrices they are parts of, and cut back."""
    whole = gathered(values)
    return sharded_like(orthogonal_parts(whole, options, parallel), values)


def orthogonal_parts(values: list[Tensor], options, parallel: DataParallel | None) -> list[Tensor]:
    """orth of each (whole) value. Across ranks each matrix is orthogonalised by one owner (cost
    rows·cols·min, longest first to the least loaded rank) and shared in one sum to which the others
    add zeros: the work splits, and every rank holds the owner's bits."""

    def polar(part: list[Tensor]) -> list[Tensor]:
        factors = newton_schulz(as_matrices(part), options.steps, options.coefficients, options.gram)
        return unstack(factors.to(values[0].dtype), part)

    if parallel is None or len(values) < 2:
        return polar(values)

    def owned(indices: list[int]) -> list[tuple]:
        return [(v,) for v in polar([values[i] for i in indices])]

    costs = [m * n * min(m, n) for m, n in (as_matrices([v]).shape[1:] for v in values)]
    shared = parallel.by_owner(costs, owned, [[v.shape] for v in values], values[0])
    return [value for (value,) in shared]


def shape_factor(param: Tensor) -> float:
    """√max(1, rows/cols) for the parameter viewed as (rows, −1); 1 for an empty one."""
    rows, columns = param.shape[0], math.prod(param.shape[1:])
    return math.sqrt(max(1.0, rows / columns)) if rows and columns else 1.0


@kernel("orth")
def orth(ctx: Ctx, x: list[Tensor]) -> list[Tensor]:
    return orthogonalise(x, ctx.options, ctx.parallel)


@kernel("muon")
def muon(ctx: Ctx, x: list[Tensor]) -> list[Tensor]:
    """torch.optim.Muon's update: momentum by lerp, Nesterov look-ahead, orth, shape factor."""
    o = ctx.options
    buffers = ctx.buffers("momentum_buffer")
    torch._foreach_lerp_(buffers, x, 1.0 - o.beta)
    look = torch._foreach_lerp(x, buffers, o.beta) if o.nesterov else buffers
    out = orthogonalise(look, o, ctx.parallel)
    factor = shape_factor(ctx.params[0])
    if factor != 1.0:
        torch._foreach_mul_(out, factor)
    return out


@kernel("adarmsuon")
def adarmsuon(ctx: Ctx, x: list[Tensor]) -> list[Tensor]:
    """orth(a)·‖a‖/‖orth(a)‖ with a = adam(x): Adam's energy on an orthogonal direction."""
    o = ctx.options
    whole = gathered(adam_direction(ctx, x, o.b1, o.b2, o.eps))  # FSDP2's shards as whole matrices
    direction = as_matrices(whole)
    ortho = as_matrices(orthogonal_parts(whole, o, ctx.parallel))
    energy = torch.linalg.vector_norm(direction, dim=(-2, -1))
    spread = torch.linalg.vector_norm(ortho, dim=(-2, -1))
    ratio = torch.where(spread > 0, energy / spread.clamp_min(torch.finfo(spread.dtype).tiny), 0.0)
    return sharded_like(unstack(ortho * ratio.view(-1, 1, 1), whole), x)
