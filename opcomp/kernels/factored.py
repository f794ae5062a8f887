"""Statistics of a parameter's own gradient kept as factors of its matrix view: Adafactor's row and
column means of g², Shampoo's Kronecker factors and SOAP's eigenbases.

A parameter of two or more dimensions is seen as its matrix view G, m × n: shape[0] × the rest (a
Conv2d weight as out × in·kh·kw). These need gradients only — no hooks, no model — so they run on
a parameter list as well as on a model's parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor

from opcomp.kernels.context import Ctx
from opcomp.kernels.decompositions import symmetric_eigh
from opcomp.kernels.matrix import as_matrices
from opcomp.kernels.table import kernel
from opcomp.layers.blocks import left_times, right_times, side_grams
from opcomp.layers.shapes import FactorForm
from opcomp.ops.registry import matrix_sides


def matrix_view(value: Tensor) -> Tensor:
    """The parameter-shaped ``value`` as its m × n matrix view."""
    return value.reshape(value.shape[0], -1)


def rms(value: Tensor) -> Tensor:
    """The root mean square of a tensor's entries."""
    return torch.linalg.vector_norm(value) / value.numel() ** 0.5


@kernel("adafactor")
def adafactor(ctx: Ctx, x: list[Tensor]) -> list[Tensor]:
    """Adafactor's update per parameter; the formula is the spec's (transformers' op order)."""
    o = ctx.options
    node = ctx.node_state
    out = []
    for index, (value, step) in enumerate(zip(x, ctx.tick())):
        beta = 1.0 - step.pow(o.decay)  # 0 at the first step: the averages start at its statistics
        square = value * value + o.eps1
        if value.ndim >= 2:
            squares = matrix_view(square)
            rows = node.shaped(index, "exp_avg_sq_row", squares.shape[:1])
            cols = node.shaped(index, "exp_avg_sq_col", squares.shape[1:])
            rows.mul_(beta).add_(squares.mean(dim=-1) * (1.0 - beta))
            cols.mul_(beta).add_(squares.mean(dim=-2) * (1.0 - beta))
            scale = (rows / rows.mean()).rsqrt().unsqueeze(-1) * cols.rsqrt().unsqueeze(-2)
            update = (scale * matrix_view(value)).reshape(value.shape)
        else:
            average = node.buffer(index, "exp_avg_sq")
            average.mul_(beta).add_(square * (1.0 - beta))
            update = average.rsqrt() * value
        update = update / (rms(update) / o.d).clamp(min=1.0)
        if o.scale_parameter:
            update = update * rms(ctx.bucket.working_params[index]).clamp(min=o.eps2)
        if o.relative_step:
            update = update * step.rsqrt().clamp(max=1e-2)
        if o.b1 > 0:
            moment = node.buffer(index, "exp_avg")
            update = moment.mul_(o.b1).add_(update, alpha=1.0 - o.b1)
        out.append(update)
    return out


def inverse_roots(matrices: Tensor, eps: float, power: int) -> Tensor:
    """(S + eps·I)^(−1/power) of a batch of symmetric PSD matrices, by eigendecomposition in at
    least fp32, in fp64 where fp32's does not converge (eigenvalues floored at the smallest
    positive float: S + eps·I is PD up to rounding)."""
    dtype = torch.promote_types(matrices.dtype, torch.float32)
    shifted = matrices.to(dtype) + eps * torch.eye(matrices.shape[-1], dtype=dtype, device=matrices.device)
    values, vectors = symmetric_eigh(shifted)
    scaled = vectors * values.clamp_min(torch.finfo(dtype).tiny).pow(-1.0 / power).unsqueeze(-2)
    return (scaled @ vectors.mT).to(matrices.dtype)


def accumulate(average: Tensor, value: Tensor, beta: float) -> None:
    """S ← beta·S + value (beta = 1: a sum), or beta·S + (1 − beta)·value below 1."""
    if beta == 1.0:
        average.add_(value)
    else:
        average.mul_(beta).add_(value, alpha=1.0 - beta)


@kernel("shampoo")
def shampoo(ctx: Ctx, x: list[Tensor]) -> list[Tensor]:
    """Shampoo per parameter: the bucket's factors updated and rooted together (one batched eigh)."""
    o = ctx.options
    node = ctx.node_state
    step = node.advance()
    if x[0].ndim < 2:
        out = []
        for index, value in enumerate(x):
            diagonal = node.buffer(index, "diag")
            if step % o.update_every == 0:
                accumulate(diagonal, value * value, o.beta)
            out.append(value * (diagonal + o.eps).rsqrt())
        return out
    grads = as_matrices(x)
    m, n = grads.shape[1:]
    forms = {"L": FactorForm.within(m, o.max_dim), "R": FactorForm.within(n, o.max_dim)}

    def stacked(name: str) -> Tensor:
        return torch.stack([node.shaped(i, name, forms[name[0]].shape()) for i in range(len(x))])

    if step % o.update_every == 0:
        grams = dict(zip(forms, side_grams(grads, forms["L"], forms["R"])))
        for index in range(len(x)):
            for name, gram in grams.items():
                accumulate(node.shaped(index, name, forms[name].shape()), gram[index], o.beta)
    if step % o.invert_every == 0:  # a padded block's padding roots to eps^(−1/(2e)), against zeros in G
        for name in forms:
            roots = inverse_roots(stacked(name), o.eps, 2 * o.exponent)
            for index in range(len(x)):  # written into, as every buffer of an in-place family is
                node.shaped(index, f"{name}_root", forms[name].shape()).copy_(roots[index])
    directions = left_times(stacked("L_root"), grads, forms["L"])
    directions = right_times(directions, stacked("R_root"), forms["R"])
    return [direction.reshape(value.shape) for direction, value in zip(directions.unbind(), x)]


def rotated(matrix: Tensor, left: Tensor | None, right: Tensor | None, back: bool = False) -> Tensor:
    """Q_Lᵀ M Q_R (``back``: Q_L M Q_Rᵀ); a missing side is the identity."""
    if left is not None:
        matrix = (left if back else left.mT) @ matrix
    if right is not None:
        matrix = matrix @ (right.mT if back else right)
    return matrix


def descending_eigenbasis(factor: Tensor) -> Tensor:
    """The eigenvectors of a symmetric factor, largest eigenvalue first (SOAP's first basis; in
    fp64 where the factor's precision does not converge)."""
    shifted = factor + 1e-30 * torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
    return symmetric_eigh(shifted)[1].flip(1)


def power_iterated(factor: Tensor, basis: Tensor, second: Tensor, dim: int) -> Tensor:
    """One power iteration from ``basis`` (qr(S·Q), in fp32), its columns ordered by the estimated
    eigenvalues; the second moment's rows (``dim`` 0) or columns (1) reordered alike, in place."""
    product = factor @ basis
    order = torch.argsort((basis * product).sum(dim=0), descending=True)
    second.copy_(second.index_select(dim, order))
    return torch.linalg.qr(product.index_select(1, order).float())[0].to(basis.dtype)


@kernel("soap")
def soap(ctx: Ctx, x: list[Tensor]) -> list[Tensor]:
    """SOAP per parameter; the formula is the spec's (the reference's op order)."""
    o = ctx.options
    node = ctx.node_state
    step = node.advance()  # the first step (0) only starts the factors and their bases
    out = []
    for index, value in enumerate(x):
        sides = soap_sides(value, o.max_dim)
        if step == 0:
            soap_factors(node, index, value, sides, o.shampoo_beta)
            out.append(torch.zeros_like(value))
            continue
        entry = node.entries[index]
        left, right = entry.get("Q_L"), entry.get("Q_R")
        view = matrix_view if value.ndim >= 2 else (lambda tensor: tensor)
        first, second = view(node.buffer(index, "exp_avg_rotated")), view(node.buffer(index, "exp_avg_sq"))
        turned = rotated(view(value), left, right)  # G' = Q_Lᵀ G Q_R, read by both moments
        first.lerp_(turned, 1.0 - o.b1)
        second.lerp_(turned.square(), 1.0 - o.b2)
        scale = (1.0 - o.b2**step) ** 0.5 / (1.0 - o.b1**step)
        direction = rotated(first / (second.sqrt() + o.eps), left, right, back=True).reshape(value.shape) * scale
        out.append(direction + o.wd * ctx.bucket.working_params[index] if o.wd else direction)
        soap_factors(node, index, value, sides, o.shampoo_beta)
        if step % o.precondition_frequency == 0 and (left is not None or right is not None):
            moment = rotated(first, left, right, back=True)  # m in the parameter's basis, for the new one
            for name, factor_name, dim in (("Q_L", "L", 0), ("Q_R", "R", 1)):
                if name in entry:
                    entry[name].copy_(power_iterated(entry[factor_name], entry[name], second, dim))
            first.copy_(rotated(moment, entry.get("Q_L"), entry.get("Q_R")))
    return out


def soap_sides(value: Tensor, max_dim: int) -> tuple[tuple[int, int] | None, ...]:
    """(m, m) and (n, n), the shapes of the left and right factors a parameter's matrix view keeps,
    None for a side not rotated (longer than ``max_dim``, or a 1-D parameter)."""
    sides = matrix_sides(tuple(value.shape))
    if sides is None:
        return None, None
    return tuple((side, side) if side <= max_dim else None for side in sides)


def soap_factors(node, index: int, value: Tensor, sides, beta: float) -> None:
    """L and R take this step's G (EMAs with ``beta``, from zero); at their start, their bases."""
    if value.ndim < 2:
        return
    grad = matrix_view(value)
    for name, basis, shape, product in (
        ("L", "Q_L", sides[0], lambda: grad @ grad.mT),
        ("R", "Q_R", sides[1], lambda: grad.mT @ grad),
    ):
        if shape is None:
            continue
        fresh = basis not in node.entries[index]
        factor = node.shaped(index, name, shape)
        factor.lerp_(product(), 1.0 - beta)
        if fresh:
            node.shaped(index, basis, shape).copy_(descending_eigenbasis(factor))
