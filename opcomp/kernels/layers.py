"""Layer kernels: KFAC, diagonal KFAC and EKFAC.

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

import math
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from opcomp.distributed import DataParallel
from opcomp.errors import OpcompError
from opcomp.finite import Checks, require
from opcomp.kernels.factors import (
    Columns,
    Kind,
    Statistics,
    StepStatistics,
    block_shape,
    diagonal_sides,
    factor_shapes,
    groups_of,
    layer_shape,
)
from opcomp.kernels.table import kernel
from opcomp.ops import Options
from opcomp.precision import working_dtype
from opcomp.state import advance


@dataclass
class LayerSlot:
    """One layer running the node: where its weight and bias sit in the flat value lists."""

    module: nn.Module
    name: str
    weight: int | None  # positions in the flat lists; None when it has no gradient this step
    bias: int | None
    columns: Columns  # what X holds, fixed at build: which of the layer's parameters run the node
    kind: Kind  # what the layer computes (an Embedding's and a Conv1D's weights are X transposed)
    state: dict  # the node's state for this layer

    @property
    def embedding(self) -> bool:
        return self.kind == "embedding"

    @property
    def block_shape(self) -> tuple[int, int, int]:
        """(groups, out, in): a grouped Conv2d's X is that many independent blocks."""
        return block_shape(self.module, self.kind, self.columns)

    @property
    def grouped(self) -> bool:
        return groups_of(self.module) > 1

    def dense(self, factor: Tensor) -> bool:
        """Whether a factor of this layer is kept as a matrix (per group), not as its diagonal."""
        return factor.ndim == 2 + self.grouped

    def sides(self, max_dim: int | None) -> tuple[bool, bool]:
        """(A kept diagonal, G kept diagonal), each group's sizes against the budget."""
        return diagonal_sides(self.kind, self.block_shape, max_dim)


@dataclass
class LayerCtx:
    """A layer kernel's view of one node over all the layers that run it this step."""

    options: Options
    layers: list[LayerSlot]
    statistics: StepStatistics  # (layer, sampled) -> this step's, and how ranks pool them
    checks: Checks  # the step's finiteness checks (opcomp.finite)

    @property
    def parallel(self) -> DataParallel | None:
        return self.statistics.parallel


def step_counts(ctx: LayerCtx) -> list[int]:
    """Each layer's count of steps taken by this node before this one (then advanced)."""
    return [advance(layer.state, layer.module.weight) for layer in ctx.layers]


def average(state: dict, name: str, value: Tensor, decay: float) -> None:
    """S ← decay·S + (1 − decay)·value; the first value starts it. Callers check a step's values
    with one ``ctx.checks`` first, so that a non-finite batch statistic abandons the step before
    anything changes. S is replaced, not written into (layer operators declare
    ``replaces_state``: a step's snapshot shares their buffers instead of copying them)."""
    if name not in state:
        state[name] = value.clone()
    else:
        state[name] = torch.lerp(value, state[name], decay)  # one pass


def fold_statistics(
    ctx: LayerCtx, counts: list[int], names: tuple[str, str], diagonal: Callable[[LayerSlot], tuple[bool, bool]]
) -> dict[int, Statistics | None]:
    """Average this step's A and G (each kept dense or as its diagonal, as ``diagonal`` says) into
    the state ``names`` of every layer whose statistics are due, pooled over the ranks in one
    reduction. Returns the due layers (by id) that some rank had statistics for, with this rank's
    (None where only others had some).

    Layers that read one input alike (:func:`~opcomp.kernels.factors.inputs_key`) share one A.
    In one process nothing is pooled, so any other dense factor's average is folded into its
    product (:func:`~opcomp.kernels.factors.mean_gram`'s ``onto``); the check then reads the new
    average, finite exactly when the old one (finite) and the step's statistic are, and not
    overflowed."""
    sampled = getattr(ctx.options, "fisher", "empirical") == "mc"
    decay = ctx.options.decay
    due = [layer for layer, count in zip(ctx.layers, counts) if count % ctx.options.update_every == 0]
    found = [ctx.statistics(layer, sampled) for layer in due]
    bf16 = getattr(ctx.options, "bf16", False)  # kfac and ekfac have it, diag_kfac not
    readers = Counter(statistics.source for statistics in found if statistics is not None)
    shared: dict[tuple, Tensor] = {}
    values, rows, averaged = [], [], set()

    def factor(layer: LayerSlot, side: int, dense, on_diagonal, kept_diagonal: bool, source) -> Tensor:
        """One factor's value: shared with the layers that read its input alike (``source``), an
        average already (recorded in ``averaged``), or this step's statistic."""
        if source is not None and readers[source] > 1:
            if (source, kept_diagonal) not in shared:
                shared[source, kept_diagonal] = on_diagonal() if kept_diagonal else dense(bf16)
            return shared[source, kept_diagonal]
        if kept_diagonal:
            return on_diagonal()
        if ctx.parallel is None and not bf16 and names[side] in layer.state:
            averaged.add(len(values))
            return dense(onto=(layer.state[names[side]], decay))
        return dense(bf16)

    for layer, statistics in zip(due, found):
        diagonal_a, diagonal_g = diagonal(layer)
        if statistics is None:  # none here: zeros that count for nothing, so every rank reduces alike
            shapes = factor_shapes(layer.block_shape, diagonal_a, diagonal_g)
            like = dict(dtype=working_dtype(layer.module.weight.dtype), device=layer.module.weight.device)
            values += [torch.zeros(shapes["in_factor"], **like), torch.zeros(shapes["out_factor"], **like)]
            rows += [0, 0]
            continue
        values.append(factor(layer, 0, statistics.A, statistics.A_diagonal, diagonal_a, statistics.source))
        values.append(factor(layer, 1, statistics.G, statistics.G_diagonal, diagonal_g, None))
        rows += [statistics.a_count, statistics.examples]
    values, rows = ctx.statistics.pooled(values, rows)
    counted = [index for index in range(len(due)) if rows[2 * index + 1]]
    checked = {id(values[2 * index + side]): values[2 * index + side] for index in counted for side in (0, 1)}
    ctx.checks(list(checked.values()))
    return stored(due, found, values, rows, averaged, names, decay)


def stored(due: list[LayerSlot], found: list, values: list[Tensor], rows: list[int], averaged: set[int], names, decay):
    """Each due layer's two factors (``values``, pooled, A then G per layer) kept in its state:
    averaged in, or as they are where the average was folded in already (``averaged``). Returns
    the layers some rank had statistics for, with this rank's."""
    fresh = {}
    for index, (layer, statistics) in enumerate(zip(due, found)):
        if not rows[2 * index + 1]:
            if names[1] not in layer.state:
                raise OpcompError(
                    f"layer '{layer.name}' has no statistics: its forward and backward must run on the model given "
                    "to opcomp.build, with gradients enabled, before opt.step()"
                )
            continue
        for side in (0, 1):
            position = 2 * index + side
            if position in averaged:
                layer.state[names[side]] = values[position]
            else:
                average(layer.state, names[side], values[position], decay)
        fresh[id(layer)] = statistics
    return fresh


def matrix_of(layer: LayerSlot, x: list[Tensor]) -> Tensor:
    """X for the layer: (out, in) — an Embedding's and a Conv1D's stored weights transposed — the
    bias as a last column when folded in. A parameter that runs the node but has no gradient this
    step contributes zeros."""
    if layer.embedding:
        return weight_matrix(layer, x[layer.weight])
    rows, inputs = layer_shape(layer.module, layer.kind)
    like = x[layer.weight if layer.weight is not None else layer.bias]
    parts = []
    if layer.columns != "bias":
        parts.append(like.new_zeros(rows, inputs) if layer.weight is None else weight_matrix(layer, x[layer.weight]))
    if layer.columns != "weight":
        parts.append(like.new_zeros(rows, 1) if layer.bias is None else x[layer.bias].reshape(rows, 1))
    matrix = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return matrix.unflatten(0, layer.block_shape[:2]) if layer.grouped else matrix  # (groups, out, in)


def weight_matrix(layer: LayerSlot, weight: Tensor) -> Tensor:
    """A value shaped like the layer's weight, as the (out, in) matrix X acts as (a view where its
    layout allows)."""
    if layer.embedding or layer.kind == "conv1d":
        return weight.T
    return weight.reshape(layer_shape(layer.module, layer.kind))


def as_weight(layer: LayerSlot, matrix: Tensor, like: Tensor) -> Tensor:
    """An (out, in) matrix back in the layout of the layer's weight: :func:`weight_matrix` undone."""
    return (matrix.T if layer.embedding or layer.kind == "conv1d" else matrix).reshape(like.shape)


def scatter(layer: LayerSlot, direction: Tensor, like: list[Tensor], out: list) -> None:
    """The layer's direction back onto the parameters that have a gradient this step."""
    direction = direction.flatten(0, 1) if layer.grouped else direction  # the groups' blocks, stacked
    if layer.weight is not None:
        columns = direction[:, :-1] if layer.columns == "weight+bias" else direction
        out[layer.weight] = as_weight(layer, columns, like[layer.weight])
    if layer.bias is not None:
        out[layer.bias] = direction[:, -1].reshape(like[layer.bias].shape)


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


def pi_split(a: Tensor, g: Tensor, damping: float, dense_a: bool, dense_g: bool) -> tuple[Tensor, Tensor]:
    """Martens & Grosse's factored damping: λ_A = π√λ, λ_G = √λ/π, π² = (tr A/dim A)/(tr G/dim G).

    0-d float64 tensors on the factors' device (one per group for a grouped layer: each group is
    its own block), so a refresh reads no value back from it; π = 1 (the damping split evenly)
    when a factor is degenerate: a trace of 0, inf or NaN.
    """
    mean_a = trace(a, dense_a).double() / max(1, a.shape[-1])
    mean_g = trace(g, dense_g).double() / max(1, g.shape[-1])
    ratio = mean_a / mean_g
    pi = torch.where((mean_g > 0) & (ratio > 0) & (ratio < math.inf), ratio.sqrt(), 1.0)
    root = math.sqrt(damping)
    return pi * root, root / pi


def trace(factor: Tensor, dense: bool) -> Tensor:
    """The trace of a factor kept dense (a matrix) or as its diagonal (a vector), per group."""
    return factor.diagonal(dim1=-2, dim2=-1).sum(-1) if dense else factor.sum(-1)


def product(left: Tensor, right: Tensor, bf16: bool) -> Tensor:
    """left @ right; with ``bf16``, the product of their bfloat16 roundings, left in bfloat16 (the
    caller returns to the working precision once, after its last product)."""
    return left.bfloat16() @ right.bfloat16() if bf16 else left @ right


def preconditioned(g_inverse: Tensor, matrix: Tensor, a_inverse: Tensor, bf16: bool = False) -> Tensor:
    """G⁻¹ X A⁻¹ in X's precision, each inverse kept dense (a matrix, or a batch of them beside a
    batch of X) or as a diagonal."""
    dense = matrix.ndim
    x = product(g_inverse, matrix, bf16) if g_inverse.ndim == dense else g_inverse.unsqueeze(-1) * matrix
    x = product(x, a_inverse, bf16) if a_inverse.ndim == dense else x * a_inverse.unsqueeze(-2)
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
        if g_inverse.ndim == a_inverse.ndim == matrix.ndim == 2 and max(matrix.shape) <= BATCHED:
            groups[matrix.shape, matrix.dtype, matrix.device, g_inverse.dtype].append(index)
        else:
            out[index] = preconditioned(g_inverse, matrix, a_inverse, bf16)
    for indices in groups.values():
        if len(indices) == 1:  # alone in its shape: nothing to batch, nothing to copy
            (index,) = indices
            out[index] = preconditioned(
                layers[index].state["G_inv"], matrices[index], layers[index].state["A_inv"], bf16
            )
            continue
        g_inverse = torch.stack([layers[i].state["G_inv"] for i in indices])
        a_inverse = torch.stack([layers[i].state["A_inv"] for i in indices])
        batch = preconditioned(g_inverse, torch.stack([matrices[i] for i in indices]), a_inverse, bf16)
        for index, direction in zip(indices, batch.unbind()):
            out[index] = direction
    return out


@dataclass
class Refresh:
    """Layers whose cached factors are due, collected so decompositions batch across layers."""

    layers: list[LayerSlot] = field(default_factory=list)
    parallel: DataParallel | None = None  # ranks that split the decompositions among them

    def eigenbases(self) -> None:
        """Eigenvalues and, for a dense factor, eigenvectors of A and G per layer, every dense
        factor in one decomposition (one split across ranks); a factor kept diagonal is its own
        eigenvalues, with the identity as basis (no Q stored)."""
        dense = [(layer, name) for name in ("A", "G") for layer in self.layers if layer.dense(layer.state[name])]
        factors = [layer.state[name] for layer, name in dense]
        decompositions = decomposed(factors, eigens, eigen_shapes, self.parallel, finite_first=True)
        for (layer, name), (values, vectors) in zip(dense, decompositions):
            layer.state[f"{name}_eigenvalues"], layer.state[f"Q_{name}"] = values, vectors
        for name in ("A", "G"):
            for layer in self.layers:
                if not layer.dense(layer.state[name]):
                    layer.state[f"{name}_eigenvalues"] = layer.state[name].clamp_min(0.0)
                    layer.state.pop(f"Q_{name}", None)


def in_eigenbasis(layer: LayerSlot, matrix: Tensor, scale: Tensor, damping: float, bf16: bool = False) -> Tensor:
    """Q_G ((Q_Gᵀ X Q_A) ⊘ (scale + λ)) Q_Aᵀ, a missing Q being the identity."""
    q_g, q_a = layer.state.get("Q_G"), layer.state.get("Q_A")
    rotated = matrix if q_g is None else product(q_g.mT, matrix, bf16)
    rotated = rotated if q_a is None else product(rotated, q_a, bf16)
    rotated = rotated / (scale + damping)
    rotated = rotated if q_g is None else product(q_g, rotated, bf16)
    return (rotated if q_a is None else product(rotated, q_a.mT, bf16)).to(matrix.dtype)


def kronecker_eigenvalues(layer: LayerSlot) -> Tensor:
    return layer.state["G_eigenvalues"].unsqueeze(-1) * layer.state["A_eigenvalues"].unsqueeze(-2)


def update_factors(ctx: LayerCtx, counts: list[int]) -> dict[int, Statistics | None]:
    """KFAC's A and G, each dense or kept diagonal by the size budget."""
    return fold_statistics(ctx, counts, ("A", "G"), lambda layer: layer.sides(ctx.options.max_dim))


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
    kept diagonal inverts element-wise. With ``bf16`` a dense inverse is kept as the bfloat16
    rounding every product takes of it (computed in the working precision, stored once)."""
    splits = [
        pi_split(
            layer.state["A"], layer.state["G"], damping, layer.dense(layer.state["A"]), layer.dense(layer.state["G"])
        )
        for layer in layers
    ]
    dense, damped = [], []
    for name, side in (("A", 0), ("G", 1)):
        for layer, split in zip(layers, splits):
            factor, lam = layer.state[name], split[side].to(layer.state[name].dtype)
            if not layer.dense(factor):
                layer.state[f"{name}_inv"] = 1.0 / (factor + lam.unsqueeze(-1))
            else:
                dense.append((layer, name))
                identity = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
                damped.append(factor + lam.unsqueeze(-1).unsqueeze(-1) * identity)
    for (layer, name), (inverse,) in zip(dense, decomposed(damped, damped_inverses, inverse_shapes, parallel)):
        layer.state[f"{name}_inv"] = inverse.bfloat16() if bf16 else inverse


@kernel("diag_kfac", collective="layers")
def diag_kfac(ctx: LayerCtx, x: list[Tensor]) -> list[Tensor]:
    """X ⊙ 1/((diag G + λ)(diag A + λ)ᵀ), the DiagFOG code's outer product of factor diagonals.
    A diagonal A leaves a bias column independent of the weight's: each is divided on its own,
    without folding them into one matrix first."""
    o = ctx.options
    out: list = [None] * len(x)
    fold_statistics(ctx, step_counts(ctx), ("A_diag", "G_diag"), lambda layer: (True, True))
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
            scales.append(statistics.eigen_scale(layer.state.get("Q_G"), layer.state.get("Q_A")))
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
