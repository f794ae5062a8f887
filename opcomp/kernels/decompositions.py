"""Decompositions of layer factors, batched by size and split among ranks, and the products
that precondition X with them: G⁻¹ X A⁻¹, and X in the factors' eigenbases."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import Tensor

from opcomp.distributed import DataParallel
from opcomp.finite import require
from opcomp.layers.blocks import left_times, right_times, trace
from opcomp.layers.record import LayerSlot
from opcomp.layers.shapes import FactorForm


def by_size(matrices: list[Tensor], operation: Callable[[Tensor], tuple]) -> list[tuple]:
    """``operation`` over a batch, once per distinct matrix size; results back in the original order."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, matrix in enumerate(matrices):
        groups[tuple(matrix.shape)].append(index)
    results: list = [None] * len(matrices)
    for indices in groups.values():
        batch = operation(torch.stack([matrices[i] for i in indices]))
        for position, index in enumerate(indices):
            results[index] = tuple(part[position] for part in batch)
    return results


def decomposed(
    matrices: list[Tensor],
    operation: Callable[[list[Tensor]], list[tuple]],
    shapes: Callable[[Tensor], list[tuple]],
    parallel: DataParallel | None,
    finite_first: bool = False,
) -> list[tuple]:
    """``operation`` (whose results have ``shapes``) over ``matrices``, which it batches by size.
    Across ranks, each matrix is decomposed by one owner (cost d³, longest first to the least
    loaded rank) and shared with the others in one sum: the work splits, and every rank holds
    the same bits. All matrices are checked finite first, in one read, across ranks (decided
    alike before the work splits) or when ``finite_first`` (an operation that cannot take NaN)."""
    if matrices and (finite_first or parallel is not None):
        require(matrices)
    if parallel is None or not matrices:
        return operation(matrices)

    def owned(indices: list[int]) -> list[tuple]:
        try:
            return operation([matrices[i] for i in indices])
        except torch.linalg.LinAlgError:  # NaN for all to see: every rank skips the step alike
            return [tuple(matrices[i].new_full(shape, math.nan) for shape in shapes(matrices[i])) for i in indices]

    layout = [shapes(matrix) for matrix in matrices]
    costs = [m.shape[-1] ** 3 * (m.numel() // max(1, m.shape[-1] ** 2)) for m in matrices]  # d³ per block
    return parallel.by_owner(costs, owned, layout, matrices[0])


def eigen_shapes(matrix: Tensor) -> list[tuple]:
    return [matrix.shape[:-1], matrix.shape]


def inverse_shapes(matrix: Tensor) -> list[tuple]:
    return [matrix.shape]


def eigens(matrices: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """:func:`eigen` of each matrix, batched by size (finite ones: ``decomposed(..., finite_first=True)``)."""
    return by_size(matrices, eigen)


def eigen(batch: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (clamped at 0: factors are PSD) and eigenvectors of symmetric matrices."""
    values, vectors = symmetric_eigh(batch)
    return values.clamp_min(0.0), vectors


def symmetric_eigh(batch: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh``, and in float64 where it fails to converge in the factors' precision:
    a large conv's input factor, with zero rows from padding and ReLU and many repeated
    eigenvalues, does that in fp32 (ResNet-18's 2304 × 2304 factors at the first step). Callers
    check the batch is finite first: factors holding inf or NaN end the step, which is then
    skipped."""
    try:
        return torch.linalg.eigh(batch)
    except torch.linalg.LinAlgError:
        if batch.dtype == torch.float64:
            raise
        values, vectors = torch.linalg.eigh(batch.double())
        return values.to(batch.dtype), vectors.to(batch.dtype)


def damped_inverses(matrices: list[Tensor]) -> list[tuple[Tensor]]:
    """Inverses of SPD matrices: a Cholesky per batch of one size, then one read of whether any
    failed (a refresh reads the device once, however many sizes it inverts), and the
    eigendecomposition for just those."""
    if not matrices:
        return []
    attempts = by_size(matrices, damped_inverse)
    failed = torch.stack([failure for _, failure in attempts]).tolist()
    redo = [index for index, flag in enumerate(failed) if flag]
    out = [(inverse,) for inverse, _ in attempts]
    if redo:
        require([matrices[i] for i in redo])
        for index, inverse in zip(redo, by_size([matrices[i] for i in redo], eigen_inverse)):
            out[index] = inverse
    return out


def damped_inverse(batch: Tensor) -> tuple[Tensor, Tensor]:
    """Inverses of SPD matrices by Cholesky, and whether each factorisation failed (read later,
    with the other batches'). Solving against the identity runs 20–30% faster than
    ``cholesky_inverse`` on CPU (docs/performance.md)."""
    factor, info = torch.linalg.cholesky_ex(batch)
    identity = torch.eye(batch.shape[-1], dtype=batch.dtype, device=batch.device).expand_as(batch)
    failed = info != 0
    return torch.cholesky_solve(identity, factor), failed.flatten(1).any(1) if failed.ndim > 1 else failed


def eigen_inverse(batch: Tensor) -> tuple[Tensor]:
    """The inverse through the eigendecomposition, for matrices whose Cholesky failed."""
    values, vectors = symmetric_eigh(batch)
    return (vectors @ torch.diag_embed(1.0 / values.clamp_min(torch.finfo(values.dtype).tiny)) @ vectors.mT,)


def pi_split(a: Tensor, g: Tensor, damping: float, a_form: FactorForm, g_form: FactorForm) -> tuple[Tensor, Tensor]:
    """Martens & Grosse's factored damping: λ_A = π√λ, λ_G = √λ/π, π² = (tr A/dim A)/(tr G/dim G).

    0-d float64 tensors on the factors' device (one per group for a grouped layer: each group is
    its own block), so a refresh reads no value back from it; π = 1 (the damping split evenly)
    when a factor is degenerate: a trace of 0, inf or NaN.
    """
    mean_a = trace(a, a_form).double() / max(1, a_form.side)
    mean_g = trace(g, g_form).double() / max(1, g_form.side)
    ratio = mean_a / mean_g
    pi = torch.where((mean_g > 0) & (ratio > 0) & (ratio < math.inf), ratio.sqrt(), 1.0)
    root = math.sqrt(damping)
    return pi * root, root / pi


def low(value: Tensor, form: FactorForm, bf16: bool) -> Tensor:
    """A product's operand as the product takes it: rounded to bfloat16 with ``bf16`` (not a diagonal's)."""
    return value.bfloat16() if bf16 and not form.diagonal else value


def preconditioned(
    g_inverse: Tensor, matrix: Tensor, a_inverse: Tensor, forms: tuple[FactorForm, FactorForm], bf16: bool = False
) -> Tensor:
    """G⁻¹ X A⁻¹ in X's precision, the inverses in ``forms`` (A's, G's): whole (a matrix, or a
    batch of them beside a batch of X), diagonal or in blocks."""
    a_form, g_form = forms
    x = left_times(low(g_inverse, g_form, bf16), low(matrix, g_form, bf16), g_form)
    x = right_times(low(x, a_form, bf16), low(a_inverse, a_form, bf16), a_form)
    return x.to(matrix.dtype)


BATCHED = 128
"""The longest side of X up to which layers of one shape are preconditioned together, one pair
of batched products for all of them: a small product costs its launch and thread wake-ups more
than its arithmetic. Stacking copies X and both inverses, which costs more than it saves past
this (on CPU, with the copies: 16 layers of 64 × 64 7.1 times faster, 8 of 128 × 128 2.5
times, 4 of 128 × 256 even, 4 of 256 × 256 0.75 times: ``python -m
opcomp.bench.preconditioning``, docs/performance.md)."""


def preconditioned_layers(layers: list[LayerSlot], matrices: list[Tensor], bf16: bool) -> list[Tensor]:
    """:func:`preconditioned` for each layer, those whose X is small and of one shape, with dense
    inverses, in one batch."""
    out: list = [None] * len(layers)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, (layer, matrix) in enumerate(zip(layers, matrices)):
        g_inverse, a_inverse = layer.state["G_inv"], layer.state["A_inv"]
        dense = all(form.dense for form in layer.forms)
        if dense and matrix.ndim == 2 and max(matrix.shape) <= BATCHED:
            groups[matrix.shape, matrix.dtype, matrix.device, g_inverse.dtype].append(index)
        else:
            out[index] = preconditioned(g_inverse, matrix, a_inverse, layer.forms, bf16)
    for indices in groups.values():
        if len(indices) == 1:  # alone in its shape: nothing to batch, nothing to copy
            (index,) = indices
            state = layers[index].state
            out[index] = preconditioned(state["G_inv"], matrices[index], state["A_inv"], layers[index].forms, bf16)
            continue
        whole = layers[indices[0]].forms  # the batch's: every one whole
        g_inverse = torch.stack([layers[i].state["G_inv"] for i in indices])
        a_inverse = torch.stack([layers[i].state["A_inv"] for i in indices])
        batch = preconditioned(g_inverse, torch.stack([matrices[i] for i in indices]), a_inverse, whole, bf16)
        for index, direction in zip(indices, batch.unbind()):
            out[index] = direction
    return out
