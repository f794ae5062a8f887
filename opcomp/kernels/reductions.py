"""Kernels with a norm or inner product per parameter, run on the bucket stacked into one slab."""

from __future__ import annotations

import torch
from torch import Tensor

from opcomp.kernels.context import Ctx
from opcomp.kernels.table import kernel


def stack(values: list[Tensor]) -> Tensor:
    """The bucket as one (n, numel) slab; equal shapes are what a bucket guarantees."""
    return torch.stack(values).reshape(len(values), -1)


def unstack(slab: Tensor, like: list[Tensor]) -> list[Tensor]:
    return [row.reshape(t.shape) for row, t in zip(slab.unbind(0), like)]


def per_row(values: Tensor) -> Tensor:
    """A per-parameter scalar, shaped to broadcast over a slab."""
    return values.unsqueeze(1)


@kernel("normalize")
def normalize(ctx: Ctx, x: list[Tensor]) -> list[Tensor]:
    """x/‖x‖ per parameter; a zero x stays zero."""
    slab = stack(x)
    norms = torch.linalg.vector_norm(slab, dim=1)
    return unstack(slab / per_row(norms.clamp_min(torch.finfo(slab.dtype).tiny)), x)


@kernel("clip")
def clip(ctx: Ctx, x: list[Tensor]) -> list[Tensor]:
    """x·min(1, max_norm/‖x‖): max_norm/0 is inf, clamped to 1, so zero stays zero."""
    slab = stack(x)
    factor = (ctx.options.max_norm / torch.linalg.vector_norm(slab, dim=1)).clamp(max=1.0)
    return unstack(slab * per_row(factor), x)


@kernel("clip_global", collective="global")
def clip_global(ctx: Ctx, x: list[Tensor]) -> list[Tensor]:
    """torch.nn.utils.clip_grad_norm_ over every parameter running the node: one 2-norm of all of
    them, the factor max_norm/(norm + 1e-6) clamped to at most 1."""
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(x)))
    factor = (ctx.options.max_norm / (total + 1e-6)).clamp(max=1.0)
    return torch._foreach_mul(x, factor)


def along(x: list[Tensor], y: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Slabs of x and y, and the coefficient c = ⟨x, y⟩/‖y‖² per parameter (0 where y = 0)."""
    xs, ys = stack(x), stack(y)
    dot = (xs * ys).sum(dim=1)
    yy = (ys * ys).sum(dim=1)
    coefficient = torch.where(yy > 0, dot / yy.clamp_min(torch.finfo(ys.dtype).tiny), torch.zeros_like(dot))
    return xs, ys, per_row(coefficient)


@kernel("project")
def project(ctx: Ctx, x: list[Tensor], y: list[Tensor]) -> list[Tensor]:
    _, ys, c = along(x, y)
    return unstack(c * ys, x)


@kernel("reject")
def reject(ctx: Ctx, x: list[Tensor], y: list[Tensor]) -> list[Tensor]:
    xs, ys, c = along(x, y)
    return unstack(xs - c * ys, x)


@kernel("graft")
def graft(ctx: Ctx, x: list[Tensor], y: list[Tensor]) -> list[Tensor]:
    """(‖y‖/‖x‖)·x per parameter: x's direction at y's size; x = 0 stays 0."""
    xs, ys = stack(x), stack(y)
    tiny = torch.finfo(xs.dtype).tiny
    ratio = torch.linalg.vector_norm(ys, dim=1) / torch.linalg.vector_norm(xs, dim=1).clamp_min(tiny)
    return unstack(xs * per_row(ratio), x)
