"""A layer's statistics of one step, from its captured micro-batches: KFAC's factors A and G, their
diagonals, and EKFAC's per-example correction (the rows come from :mod:`opcomp.layers.samples`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from opcomp.capture import Capture, Entry
from opcomp.distributed import DataParallel
from opcomp.layers.blocks import gram_layout, left_times, rows_times
from opcomp.layers.kinds import LayerKind, kind_of
from opcomp.layers.samples import ConvSample, Sample
from opcomp.layers.shapes import Columns, FactorForm
from opcomp.layers.summed import SummedConvSample, identity, joined
from opcomp.precision import working_dtype

Reduction = Literal["mean", "sum"]
Average = tuple[Tensor, float]
"""A factor's running average S and its decay, to fold a step's statistic into: decay·S + (1 − decay)·value."""

CHUNK = 1 << 22
"""Elements of per-example gradients formed at once by the EKFAC correction (16 MiB in fp32)."""


@dataclass
class Statistics:
    """A layer's samples of one step and what they make: A, G, their diagonals, EKFAC's scale."""

    samples: list[Sample]
    examples: int  # N, over every micro-batch
    reduce: bool = False  # Conv2d: one row per example
    vocabulary: int = 0  # Embedding: the number of tokens
    gradient_scale: float = 1.0  # per-example gradients are this times d: N for a mean-reduced loss
    source: tuple | None = None  # what A is made of: equal for layers that read one input alike (see inputs_key)

    def _rows(self, side: str) -> list[Tensor]:
        return [sample.rows(side, self.reduce) for sample in self.samples]

    @property
    def a_count(self) -> int:
        """Rows of A: one per example of a Conv2d, one per position otherwise (from shapes alone)."""
        return sum(sample.count(self.reduce) for sample in self.samples)

    def A(self, bf16: bool = False, onto: Average | None = None, form: FactorForm | None = None) -> Tensor:
        return mean_gram(self._rows("a"), self.a_count, bf16, onto, form)

    def A_diagonal(self) -> Tensor:
        if self.vocabulary:
            ids = torch.cat(self._rows("a"))
            return torch.bincount(ids, minlength=self.vocabulary).to(self.samples[0].d.dtype) / len(ids)
        return mean_square(self._rows("a"), self.a_count)

    @property
    def _g_count(self) -> float:
        """G's divisor: N over the square of the gradients' scale (every statistic is quadratic in d)."""
        return self.examples / self.gradient_scale**2

    def G(self, bf16: bool = False, onto: Average | None = None, form: FactorForm | None = None) -> Tensor:
        return mean_gram(self._rows("d"), self._g_count, bf16, onto, form)

    def G_diagonal(self) -> Tensor:
        return mean_square(self._rows("d"), self._g_count)

    def eigen_scale(self, q_g: Tensor | None, q_a: Tensor | None, g_form: FactorForm, a_form: FactorForm) -> Tensor:
        """E_n[(Q_Gᵀ ∇W_n Q_A)²] over per-example gradients ∇W_n = Σ_s d_ns a_nsᵀ, (out, in).

        Positions are summed before squaring: that is what makes it the per-example gradient of a
        conv or a sequence model, not of its rows. A missing Q (a factor kept diagonal, an
        Embedding's A) is the identity; a Q in blocks (``g_form``, ``a_form``) rotates each block.
        """
        if self.vocabulary:
            return self._embedding_scale(q_g, g_form)
        total = None
        for sample in self.samples:
            scale = summed_then_rotated if rotates_after_summing(sample) else rotated_then_summed
            part = scale(sample, q_g, g_form, q_a, a_form)
            total = part if total is None else total + part
        return total / self._g_count

    def _embedding_scale(self, q_g: Tensor | None, g_form: FactorForm) -> Tensor:
        """Rows of one example that hit one token add up before squaring (X is (dim, vocabulary))."""
        dim = self.samples[0].d.shape[-1]
        total = torch.zeros(self.vocabulary, dim, dtype=self.samples[0].d.dtype, device=self.samples[0].d.device)
        for sample in self.samples:
            d = (sample.d if q_g is None else rows_times(sample.d, q_g, g_form)).flatten(0, 1)
            example = torch.arange(len(sample.a), device=d.device).unsqueeze(1).expand_as(sample.a)
            pairs, which = torch.unique((example * self.vocabulary + sample.a).flatten(), return_inverse=True)
            summed = torch.zeros(len(pairs), d.shape[1], dtype=d.dtype, device=d.device).index_add_(0, which, d)
            total.index_add_(0, pairs % self.vocabulary, summed.square())
        return total.T / self._g_count


def rotates_after_summing(sample: Sample) -> bool:
    """Whether a conv's per-example gradients are cheaper rotated by Q_A after summing over the
    positions (∇W_n Q_A: out·in² per example) than with the patches rotated at every position
    ((a Q_A)_s: positions·in² per example, one conv): when the output has fewer channels than
    positions, as early layers of a CNN do (an ungrouped conv whose weight is in A)."""
    return (
        isinstance(sample, ConvSample)
        and sample.groups == 1
        and sample.columns != "bias"
        and sample.grad.shape[1] < sample.positions
    )


def rotated_then_summed(
    sample: Sample, q_g: Tensor | None, g_form: FactorForm, q_a: Tensor | None, a_form: FactorForm
) -> Tensor:
    """Σ_n ((d_n Q_G)ᵀ (a_n Q_A))²: the rows rotated at every position, then each example's
    product over its positions, CHUNK values of per-example gradients at a time."""
    d = sample.d if q_g is None else rows_times(sample.d, q_g, g_form)
    a = sample.rotated_a(q_a, a_form)
    if d.ndim == 4:  # a grouped conv: (N, S, groups, ·), one block per group
        chunk = max(1, CHUNK // max(1, d.shape[2] * d.shape[3] * a.shape[3]))
        return sum(
            squares_summed(torch.einsum("nsko,nski->nkoi", d[i : i + chunk], a[i : i + chunk]))
            for i in range(0, len(d), chunk)
        )
    if d.shape[1] == 1:  # no sharing: Σ_n (d_n²)(a_n²)ᵀ in one product
        return (d[:, 0] * d[:, 0]).T @ (a[:, 0] * a[:, 0])
    chunk = max(1, CHUNK // max(1, d.shape[2] * a.shape[2]))
    return sum(
        squares_summed(torch.einsum("nso,nsi->noi", d[i : i + chunk], a[i : i + chunk]))
        for i in range(0, len(d), chunk)
    )


def summed_then_rotated(
    sample: ConvSample, q_g: Tensor | None, g_form: FactorForm, q_a: Tensor | None, a_form: FactorForm
) -> Tensor:
    """Σ_n (Q_Gᵀ (d_nᵀ a_n) Q_A)², CHUNK values of per-example gradients at a time. The output
    gradients are rotated as the conv laid them out, (N, out, positions), which the weight-gradient
    kernel reads without a copy. A folded bias's column of the gradients is d summed over
    positions, appended to them rather than a column of ones to the patches."""
    columns = sample.grad.flatten(2)
    columns = columns if q_g is None else left_times(q_g, columns, g_form, transposed=True)
    chunk = max(1, CHUNK // max(1, columns.shape[1] * sample.width))
    total = None
    for start in range(0, len(columns), chunk):
        block = columns[start : start + chunk]
        gradients = sample.example_gradients(block, start, start + chunk)  # (n, out, in)
        if sample.columns == "weight+bias":
            gradients = torch.cat([gradients, block.sum(2, keepdim=True)], -1)
        if q_a is not None:
            gradients = rows_times(gradients, q_a, a_form)
        part = squares_summed(gradients)
        total = part if total is None else total.add_(part)
    return total


def squares_summed(temporary: Tensor) -> Tensor:
    """Σ_n x_n² over the first dimension, squared in place (``x * x``: pow is five times slower on
    CPU): per-example gradients are a temporary, and a fresh product's pages cost more than the
    product (1.38 against 0.54 ms for 64 × 64 × 577 here)."""
    return temporary.mul_(temporary).sum(0)


def mean_square(blocks: list[Tensor], count: float) -> Tensor:
    """Σ r² / count over the rows of each block, per column (``r * r``: pow(2) is five times slower
    on CPU), the blocks' sums added and divided in place."""
    total = None
    for rows in blocks:
        part = (rows * rows).sum(0)
        total = part if total is None else total.add_(part)
    return total.div_(count)


def mean_gram(
    blocks: list[Tensor], count: float, bf16: bool, onto: Average | None = None, form: FactorForm | None = None
) -> Tensor:
    """Σ rᵀr / count over blocks of rows, in the rows' precision (a grouped layer's rows (N, groups,
    n) give one gram per group, (groups, n, n); a factor kept in blocks (``form``) one gram per
    block, ([groups,] count, block, block)). With ``bf16`` each block is rounded to bfloat16
    once and its product comes back rounded to bfloat16; otherwise 1/count lands on whichever is
    smaller, a block or its product.

    ``onto`` = (S, decay), without ``bf16``: decay·S + (1 − decay)·Σ rᵀr / count instead, a new
    tensor made by ``addmm``'s beta and alpha: the step's factor is never formed, divided or mixed
    in a pass of its own (fog's ``opt.step`` on the bench MLP: 30.6 → 28.0 ms, docs/performance.md)."""
    blocks = [gram_layout(rows, form or FactorForm(rows.shape[-1])) for rows in blocks]
    if onto is not None and not bf16:
        average, decay = onto
        weight = (1 - decay) / count
        if blocks[0].ndim > 3:  # groups and blocks: one batch dimension for baddbmm
            blocks = [rows.flatten(0, -3) for rows in blocks]
        batched = blocks[0].ndim == 3
        flat = average.reshape(-1, *average.shape[-2:]) if batched else average
        total = (torch.baddbmm if batched else torch.addmm)(flat, blocks[0].mT, blocks[0], beta=decay, alpha=weight)
        for rows in blocks[1:]:
            (total.baddbmm_ if batched else total.addmm_)(rows.mT, rows, alpha=weight)
        return total.reshape(average.shape)
    total = None
    for rows in blocks:
        if bf16:
            low = rows.bfloat16()
            part = (low.mT @ low).to(rows.dtype).div_(count)
        elif rows.shape[-2] < rows.shape[-1]:  # fewer rows than columns: divide the rows
            part = rows.mT @ (rows / count)
        else:
            part = (rows.mT @ rows).div_(count)
        total = part if total is None else total.add_(part)
    return total


class StepStatistics:
    """This step's statistics per (layer, columns, sampled), taken from the capture and computed on
    first use (``step_statistics(layer_slot, sampled) -> Statistics | None``), and the data-parallel
    group whose ranks pool theirs (None in one process)."""

    def __init__(self, capture: Capture, reduction: Reduction, parallel: DataParallel | None = None) -> None:
        self.entries = {module: capture.take(module) for module in capture.modules}
        self.reduction, self.parallel = reduction, parallel
        self.cache: dict[tuple, Statistics | None] = {}

    def __call__(self, layer, sampled: bool) -> Statistics | None:
        key = (layer.module, layer.columns, sampled)
        if key not in self.cache:
            usable = [e for e in self.entries[layer.module] if not sampled or e.sampled is not None]
            found = statistics(layer.module, usable, self.reduction, layer.columns, sampled) if usable else None
            self.cache[key] = found
        return self.cache[key]

    def pooled(self, values: list[Tensor], counts: list[int]) -> tuple[list[Tensor], list[float]]:
        """Each value a mean over its count of rows, pooled over the ranks (as it is in one process)."""
        if self.parallel is None or not values:  # nothing due: the same on every rank, so none reduces
            return values, [float(n) for n in counts]
        return self.parallel.pooled(values, counts)


def statistics(
    module: nn.Module, entries: list[Entry], reduction: Reduction, columns: Columns, sampled: bool
) -> Statistics:
    """The statistics of ``module`` from its captured entries, in the weight's working precision.

    Sampled (Monte Carlo) gradients are per-example already: they start from ∂ℓ_n/∂f_n, not from
    the batch loss, so only the user's gradients are rescaled by the reduction.
    """
    dtype = working_dtype(module.weight.dtype)
    kind = kind_of(module)
    forwards: dict[int, list[Entry]] = {}
    for entry in entries:
        forwards.setdefault(entry.forward, []).append(entry)
    examples = sum(entry_examples(kind, group[0]) for group in forwards.values())
    scale = examples if reduction == "mean" and not sampled else 1
    samples = []
    for group in forwards.values():  # a layer called twice in one forward shares its weight over both calls
        if group[0].summed is not None:  # summed at capture (Capture.summed): reduced rows only
            samples.append(SummedConvSample(joined([e.summed for e in group]), columns))
            continue
        parts = [kind.sample(module, e.input, e.sampled if sampled else e.grad, columns, dtype) for e in group]
        if len(parts) == 1:
            samples.append(parts[0])
        else:
            samples.append(Sample(torch.cat([p.a for p in parts], 1), torch.cat([p.d for p in parts], 1)))
    vocabulary = module.num_embeddings if kind.one_hot else 0
    key = None if vocabulary else inputs_key(module, entries)
    source = None if key is None else (key, columns, dtype)
    return Statistics(samples, examples, kind.reduce, vocabulary, scale, source)


def entry_examples(kind: LayerKind, entry: Entry) -> int:
    return entry.summed.examples if entry.summed is not None else kind.examples(entry.input)


def inputs_key(module: nn.Module, entries: list[Entry]) -> tuple | None:
    """Which inputs a layer read, and how it takes its rows from them: layers that agree (a
    transformer's query, key and value projections, a gated MLP's gate and up) have one A, formed
    once. An input is known by its memory, layout and version: the same values, not only the same
    shape; a Conv2d's rows depend on its kernel geometry too. None, shared with no other layer,
    when an input cannot be told apart so (a tensor subclass, an inference tensor: no version)."""
    geometry = kind_of(module).geometry(module)
    read = []
    for entry in entries:
        source = entry.summed.source if entry.summed is not None else identity(entry.input)
        if source is None:
            return None
        read.append((entry.forward, *source))
    return geometry, tuple(read)
