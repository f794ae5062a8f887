"""What a layer kernel sees, and the helpers every layer kernel shares.

A layer kernel sees every parameter of an expression that runs its node, at once, because a
layer's weight and bias share one preconditioner: X = [x_W | x_b] (the bias folded in as the
last input column, when the bias runs the node too; X = x_b alone, with A = 1, when only the bias
runs it). Statistics are per layer and live in the state of the layer's weight (or its bias when
only the bias runs the node). Factor averages start at the first batch's statistics and then
decay: S ← decay·S + (1 − decay)·S_batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from opcomp.distributed import DataParallel
from opcomp.errors import OpcompError
from opcomp.finite import Checks
from opcomp.layers.record import LayerSlot
from opcomp.layers.shapes import FactorForm, factor_shapes
from opcomp.layers.statistics import Statistics, StepStatistics
from opcomp.ops import Options
from opcomp.precision import working_dtype
from opcomp.state import advance


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
    ctx: LayerCtx,
    counts: list[int],
    names: tuple[str, str],
    forms: Callable[[LayerSlot], tuple[FactorForm, FactorForm]],
) -> dict[int, Statistics | None]:
    """Average this step's A and G (each kept whole, diagonal or in blocks, as ``forms`` says) into
    the state ``names`` of every layer whose statistics are due, pooled over the ranks in one
    reduction. Returns the due layers (by id) that some rank had statistics for, with this rank's
    (None where only others had some).

    Layers that read one input alike (:func:`~opcomp.layers.statistics.inputs_key`) share one A.
    In one process nothing is pooled, so any other dense factor's average is folded into its
    product (:func:`~opcomp.layers.statistics.mean_gram`'s ``onto``); the check then reads the new
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

    def factor(layer: LayerSlot, side: int, gram, on_diagonal, form: FactorForm, source) -> Tensor:
        """One factor's value: shared with the layers that read its input alike (``source``), an
        average already (recorded in ``averaged``), or this step's statistic."""
        if source is not None and readers[source] > 1:
            if (source, form) not in shared:
                shared[source, form] = on_diagonal() if form.diagonal else gram(bf16, form=form)
            return shared[source, form]
        if form.diagonal:
            return on_diagonal()
        if ctx.parallel is None and not bf16 and names[side] in layer.state:
            averaged.add(len(values))
            return gram(onto=(layer.state[names[side]], decay), form=form)
        return gram(bf16, form=form)

    for layer, statistics in zip(due, found):
        a_form, g_form = forms(layer)
        if statistics is None:  # none here: zeros that count for nothing, so every rank reduces alike
            shapes = factor_shapes(layer.block_shape, a_form, g_form)
            like = dict(dtype=working_dtype(layer.module.weight.dtype), device=layer.module.weight.device)
            values += [torch.zeros(shapes["in_factor"], **like), torch.zeros(shapes["out_factor"], **like)]
            rows += [0, 0]
            continue
        values.append(factor(layer, 0, statistics.A, statistics.A_diagonal, a_form, statistics.source))
        values.append(factor(layer, 1, statistics.G, statistics.G_diagonal, g_form, None))
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
    if layer.kind.one_hot:
        return weight_matrix(layer, x[layer.weight])
    rows, inputs = layer.kind.shape(layer.module)
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
    if layer.kind.transposed:
        return weight.T
    return weight.reshape(layer.kind.shape(layer.module))


def as_weight(layer: LayerSlot, matrix: Tensor, like: Tensor) -> Tensor:
    """An (out, in) matrix back in the layout of the layer's weight: :func:`weight_matrix` undone."""
    return (matrix.T if layer.kind.transposed else matrix).reshape(like.shape)


def scatter(layer: LayerSlot, direction: Tensor, like: list[Tensor], out: list) -> None:
    """The layer's direction back onto the parameters that have a gradient this step."""
    direction = direction.flatten(0, 1) if layer.grouped else direction  # the groups' blocks, stacked
    if layer.weight is not None:
        columns = direction[:, :-1] if layer.columns == "weight+bias" else direction
        out[layer.weight] = as_weight(layer, columns, like[layer.weight])
    if layer.bias is not None:
        out[layer.bias] = direction[:, -1].reshape(like[layer.bias].shape)
