"""The KFAC family's kernels: KFAC, diagonal KFAC and EKFAC.

A layer kernel sees every parameter of an expression that runs its node, at once, because a
layer's weight and bias share one preconditioner: X = [x_W | x_b] (the bias folded in as the
last input column, when the bias runs the node too; X = x_b alone, with A = 1, when only the bias
runs it). Statistics are per layer and live in the state of the layer's weight (or its bias when
only the bias runs the node).

Conventions (row-major): X is (out, in) — an Embedding's weight (vocabulary, dim) is transposed to
(dim, vocabulary) — and F ≈ G ⊗ A, so (G ⊗ A + λI)⁻¹ vec X = Q_G ((Q_Gᵀ X Q_A) ⊘ (λ_G λ_Aᵀ + λ)) Q_Aᵀ.
Factor averages start at the first batch's statistics and then decay:
S ← decay·S + (1 − decay)·S_batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from opcomp.distributed import DataParallel
from opcomp.kernels.decompositions import (
    damped_inverses,
    decomposed,
    eigen_shapes,
    eigens,
    inverse_shapes,
    low,
    pi_split,
    preconditioned_layers,
)
from opcomp.kernels.layer_context import (
    LayerCtx,
    as_weight,
    average,
    fold_statistics,
    matrix_of,
    scatter,
    step_counts,
    weight_matrix,
)
from opcomp.kernels.table import kernel
from opcomp.layers.blocks import eigen_assembled, left_times, pieces, right_times
from opcomp.layers.record import LayerSlot
from opcomp.layers.shapes import FactorForm
from opcomp.layers.statistics import Statistics

NAMES = ("A", "G")
"""KFAC's factors, in the order of :attr:`LayerSlot.forms`: A (input side), G (output side)."""


@dataclass
class Refresh:
    """Layers whose cached factors are due, collected so decompositions batch across layers."""

    layers: list[LayerSlot] = field(default_factory=list)
    parallel: DataParallel | None = None  # ranks that split the decompositions among them

    def eigenbases(self) -> None:
        """Eigenvalues and, for a factor kept whole or in blocks, eigenvectors of A and G per
        layer, every such factor (every block) in one decomposition (one split across ranks); a
        factor kept diagonal is its own eigenvalues, with the identity as basis (no Q stored)."""
        kept = [(layer, side, layer.forms[side]) for side in (0, 1) for layer in self.layers]
        kept = [(layer, side, form) for layer, side, form in kept if not form.diagonal]
        pieces_of = [pieces(layer.state[NAMES[side]], form) for layer, side, form in kept]
        flat = [piece for each in pieces_of for piece in each]
        decompositions = iter(decomposed(flat, eigens, eigen_shapes, self.parallel, finite_first=True))
        for (layer, side, form), each in zip(kept, pieces_of):
            values, vectors = eigen_assembled([next(decompositions) for _ in each], form)
            layer.state[f"{NAMES[side]}_eigenvalues"], layer.state[f"Q_{NAMES[side]}"] = values, vectors
        for side, name in enumerate(NAMES):
            for layer in self.layers:
                if layer.forms[side].diagonal:
                    layer.state[f"{name}_eigenvalues"] = layer.state[name].clamp_min(0.0)
                    layer.state.pop(f"Q_{name}", None)


def in_eigenbasis(layer: LayerSlot, matrix: Tensor, scale: Tensor, damping: float, bf16: bool = False) -> Tensor:
    """Q_G ((Q_Gᵀ X Q_A) ⊘ (scale + λ)) Q_Aᵀ, a missing Q being the identity, a Q in blocks
    rotating each block."""
    q_g, q_a = layer.state.get("Q_G"), layer.state.get("Q_A")  # present only for a form that is not diagonal
    a_form, g_form = layer.forms
    rotated = matrix
    if q_g is not None:
        rotated = left_times(low(q_g, g_form, bf16), low(rotated, g_form, bf16), g_form, transposed=True)
    if q_a is not None:
        rotated = right_times(low(rotated, a_form, bf16), low(q_a, a_form, bf16), a_form)
    rotated = rotated / (scale + damping)
    if q_g is not None:
        rotated = left_times(low(q_g, g_form, bf16), low(rotated, g_form, bf16), g_form)
    if q_a is not None:
        rotated = right_times(low(rotated, a_form, bf16), low(q_a, a_form, bf16), a_form, transposed=True)
    return rotated.to(matrix.dtype)


def kronecker_eigenvalues(layer: LayerSlot) -> Tensor:
    return layer.state["G_eigenvalues"].unsqueeze(-1) * layer.state["A_eigenvalues"].unsqueeze(-2)


def update_factors(ctx: LayerCtx, counts: list[int]) -> dict[int, Statistics | None]:
    """KFAC's A and G, each whole or in blocks by the node's ``block`` and size budget."""
    return fold_statistics(ctx, counts, NAMES, lambda layer: layer.forms)


@kernel("kfac", collective="layers")
def kfac(ctx: LayerCtx, x: list[Tensor]) -> list[Tensor]:
    o = ctx.options
    counts = step_counts(ctx)
    update_factors(ctx, counts)
    due = Refresh([layer for layer, count in zip(ctx.layers, counts) if count % o.invert_every == 0], ctx.parallel)
    if o.damping_mode == "exact":
        due.eigenbases()
    else:
        invert_factored(due.layers, o.damping, ctx.parallel, o.bf16)
    out: list = [None] * len(x)
    matrices = [matrix_of(layer, x) for layer in ctx.layers]
    if o.damping_mode == "exact":
        directions = [
            in_eigenbasis(layer, matrix, kronecker_eigenvalues(layer), o.damping, o.bf16)
            for layer, matrix in zip(ctx.layers, matrices)
        ]
    else:
        directions = preconditioned_layers(ctx.layers, matrices, o.bf16)
    for layer, direction in zip(ctx.layers, directions):
        scatter(layer, direction, x, out)
    return out


def invert_factored(
    layers: list[LayerSlot], damping: float, parallel: DataParallel | None = None, bf16: bool = False
) -> None:
    """A_inv = (A + λ_A I)⁻¹, G_inv = (G + λ_G I)⁻¹ with π-split damping, batched by size; a factor
    kept diagonal inverts element-wise, one in blocks block by block (a padded block's padding
    inverts to 1/λ, against zeros in X). With ``bf16`` an inverse kept whole or in blocks is kept
    as the bfloat16 rounding every product takes of it (computed in the working precision, stored once)."""
    splits = [pi_split(layer.state["A"], layer.state["G"], damping, *layer.forms) for layer in layers]
    dense, damped = [], []
    for side, name in enumerate(NAMES):
        for layer, split in zip(layers, splits):
            factor = layer.state[name]
            lam = split[side].to(factor.dtype)
            lam = lam.reshape(lam.shape + (1,) * (factor.ndim - lam.ndim))  # per group, over the rest
            if layer.forms[side].diagonal:
                layer.state[f"{name}_inv"] = 1.0 / (factor + lam)
            else:
                dense.append((layer, name))
                identity = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
                damped.append(factor + lam * identity)
    for (layer, name), (inverse,) in zip(dense, decomposed(damped, damped_inverses, inverse_shapes, parallel)):
        layer.state[f"{name}_inv"] = inverse.bfloat16() if bf16 else inverse


def diagonals(layer: LayerSlot) -> tuple[FactorForm, FactorForm]:
    """Diagonal KFAC's forms: both factors as their diagonals."""
    _, out, inputs = layer.block_shape
    return FactorForm.diagonal_of(inputs), FactorForm.diagonal_of(out)


@kernel("diag_kfac", collective="layers")
def diag_kfac(ctx: LayerCtx, x: list[Tensor]) -> list[Tensor]:
    """X ⊙ 1/((diag G + λ)(diag A + λ)ᵀ), the DiagFOG code's outer product of factor diagonals.
    A diagonal A leaves a bias column independent of the weight's: each is divided on its own,
    without folding them into one matrix first."""
    o = ctx.options
    out: list = [None] * len(x)
    fold_statistics(ctx, step_counts(ctx), ("A_diag", "G_diag"), diagonals)
    for layer in ctx.layers:
        g, a = layer.state["G_diag"] + o.damping, layer.state["A_diag"] + o.damping
        if layer.grouped:  # each group's block by its own diagonals
            scatter(layer, matrix_of(layer, x) / (g.unsqueeze(-1) * a.unsqueeze(-2)), x, out)
            continue
        if layer.weight is not None and layer.columns != "bias":
            weight = x[layer.weight]
            columns = a[:-1] if layer.columns == "weight+bias" else a
            out[layer.weight] = as_weight(layer, weight_matrix(layer, weight) / (g.unsqueeze(1) * columns), weight)
        if layer.bias is not None and layer.columns != "weight":
            bias = x[layer.bias]
            out[layer.bias] = (bias.reshape(-1) / (g * a[-1])).reshape(bias.shape)
    return out


@kernel("ekfac", collective="layers")
def ekfac(ctx: LayerCtx, x: list[Tensor]) -> list[Tensor]:
    """KFAC's eigenbasis with its eigenvalues refitted to per-example gradients (George et al. 2018).

    The scale s is E_n[(Q_Gᵀ ∇W_n Q_A)²] over per-example gradients, averaged with ``decay`` over
    statistics steps. A refresh recomputes the eigenbases; the old s belongs to the old basis, so it
    restarts from this step's correction in the new one (from the Kronecker eigenvalues λ_G λ_Aᵀ
    when the refresh falls on a step without statistics).
    """
    o = ctx.options
    counts = step_counts(ctx)
    fresh = update_factors(ctx, counts)
    due = Refresh([layer for layer, count in zip(ctx.layers, counts) if count % o.invert_every == 0], ctx.parallel)
    due.eigenbases()
    for layer in due.layers:
        layer.state.pop("scale", None)  # fitted in the old basis
        if id(layer) not in fresh:
            layer.state["scale"] = kronecker_eigenvalues(layer)
    corrected = [layer for layer in ctx.layers if id(layer) in fresh]
    scales, examples = [], []
    for layer in corrected:
        statistics = fresh[id(layer)]
        if statistics is None:  # only other ranks had statistics for it
            scales.append(torch.zeros_like(kronecker_eigenvalues(layer)))
            examples.append(0)
        else:
            a_form, g_form = layer.forms
            scales.append(statistics.eigen_scale(layer.state.get("Q_G"), layer.state.get("Q_A"), g_form, a_form))
            examples.append(statistics.examples)
    scales = ctx.statistics.pooled(scales, examples)[0]
    ctx.checks(scales)
    for layer, scale in zip(corrected, scales):
        average(layer.state, "scale", scale, o.decay)
    out: list = [None] * len(x)
    for layer in ctx.layers:
        direction = in_eigenbasis(layer, matrix_of(layer, x), layer.state["scale"], o.damping, o.bf16)
        scatter(layer, direction, x, out)
    return out
