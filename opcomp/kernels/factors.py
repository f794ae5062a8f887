"""A layer's statistics of one step, from its captured micro-batches: KFAC's factors and EKFAC's
per-example correction.

Every supported layer is brought to one form, the weight-sharing form of each micro-batch:
``a`` (N, S, in) holds the inputs of each example at each of its S shared positions (a Linear's
leading dimensions, a Conv2d's unfolded patches; the bias as an appended 1 when it is folded in,
only that 1 when the bias runs the node alone), ``d`` (N, S, out) the output gradients at the
same positions, which ``gradient_scale`` turns into per-example ones (applied once to each
statistic: all are quadratic in d). With d so scaled, the per-example gradient of the layer is
∇W_n = Σ_s d_ns a_nsᵀ, and

- ``Linear`` over any leading dimensions ("expand"): every position is a row of A and G;
  A = mean over rows of a aᵀ, G = Σ_rows d dᵀ / N (G sums over an example's positions);
- ``Conv2d`` ("reduce"): one row per example, patches averaged and gradients summed over positions,
  A = mean of ā āᵀ, G = Σ_n d̄ d̄ᵀ / N; exact with average pooling or one repeated input;
- ``Embedding``: the input is one-hot, so A is diagonal (token counts / positions), ``a`` holds ids.

N counts examples over every micro-batch since the last step: a micro-batch is one forward of the
model, and with a mean-reduced loss the standard accumulation (each micro-batch's loss divided by
their number k) leaves gradients that N·grad turns into per-example ones, so accumulated factors
equal the whole batch's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.utils import _pair

from opcomp.capture import Capture, Entry
from opcomp.distributed import DataParallel
from opcomp.precision import working_dtype

Reduction = Literal["mean", "sum"]
Average = tuple[Tensor, float]
"""A factor's running average S and its decay, to fold a step's statistic into: decay·S + (1 − decay)·value."""
Kind = Literal["linear", "conv1d", "conv2d", "embedding"]
"""What a layer computes, as its statistics see it."""
Columns = Literal["weight", "weight+bias", "bias"]
"""What a layer's matrix X holds: its weight, the weight with the bias as a last column, or the bias alone."""

CHUNK = 1 << 22
"""Elements of per-example gradients formed at once by the EKFAC correction (16 MiB in fp32)."""


@dataclass
class Sample:
    """One micro-batch of a layer in the weight-sharing form."""

    a: Tensor  # (N, S, in); an Embedding's token ids (N, S)
    d: Tensor  # (N, S, out) output gradients as captured: per-example ones are gradient_scale · d

    def rows(self, side: str, reduce: bool) -> Tensor:
        """A's rows (``side`` "a") or G's ("d"): one per position, or with ``reduce`` one per
        example, a averaged and d summed over its positions."""
        if side == "a":
            return self.a.mean(1) if reduce else self.a.flatten(0, 1)
        return self.d.sum(1) if reduce else self.d.flatten(0, 1)

    def count(self, reduce: bool) -> int:
        """A's rows: examples, or examples times positions."""
        return self.d.shape[0] if reduce else self.d.shape[0] * self.d.shape[1]

    def rotated_a(self, q: Tensor | None) -> Tensor:
        """a Q, (N, S, in) (a grouped layer's (N, S, groups, in), each group by its Q); a missing Q
        is the identity."""
        return self.a if q is None else rotated(self.a, q)


def rotated(rows: Tensor, q: Tensor) -> Tensor:
    """rows @ q: (…, in) by (in, in), or grouped (…, groups, in) by each group's (groups, in, in)."""
    return rows @ q if q.ndim == 2 else torch.einsum("...ki,kij->...kj", rows, q)


class ConvSample(Sample):
    """A Conv2d's micro-batch, formed as far as it is used (``a`` and ``d`` on first use). Its
    reduced rows (what KFAC and diagonal KFAC read) come without unfolding the input: each entry
    of a patch averaged over the output positions is :func:`patch_means`, and d summed over them
    a sum over the gradient's spatial dimensions; EKFAC's patches rotated by Q_A are a
    convolution (:meth:`rotated_a`).
    The unfolded (N, S, in) patches, a copy kernel-size times the input's, are made only when
    asked for: a layer called twice in one forward, EKFAC with A kept diagonal."""

    def __init__(self, module: nn.Conv2d, inputs: Tensor, grad: Tensor, columns: Columns, dtype: torch.dtype):
        self.module, self.columns, self.dtype = module, columns, dtype
        self.inputs = (inputs if inputs.ndim == 4 else inputs.unsqueeze(0)).to(dtype)
        self.grad = (grad if grad.ndim == 4 else grad.unsqueeze(0)).to(dtype)

    @property
    def groups(self) -> int:
        return self.module.groups

    def _by_group(self, values: Tensor) -> Tensor:
        """(…, groups·n) as (…, groups, n) for a grouped conv (channels are group-major); as is otherwise."""
        return values if self.groups == 1 else values.unflatten(-1, (self.groups, -1))

    @cached_property
    def a(self) -> Tensor:
        module = self.module
        patches = F.unfold(
            self.inputs, module.kernel_size, dilation=module.dilation, padding=_padding(module), stride=module.stride
        )
        # (N, positions, C·kh·kw), grouped (N, positions, groups, C/groups·kh·kw)
        return _with_bias_column(self._by_group(patches.transpose(1, 2)), self.columns)

    @cached_property
    def d(self) -> Tensor:
        return self._by_group(self.grad.flatten(2).transpose(1, 2))  # (N, positions, [groups,] out)

    def rows(self, side: str, reduce: bool) -> Tensor:
        if not reduce:
            return super().rows(side, reduce)
        if side == "d":
            return self._by_group(self.grad.sum((2, 3)))
        if self.columns == "bias":
            return self.inputs.new_ones(self.inputs.shape[0], *((self.groups,) if self.groups > 1 else ()), 1)
        means = self._by_group(patch_means(self.inputs, self.module))
        return _with_bias_column(means, self.columns)

    def count(self, reduce: bool) -> int:
        examples, _, height, width = self.grad.shape
        return examples if reduce else examples * height * width

    def rotated_a(self, q: Tensor | None) -> Tensor:
        """a Q without unfolding: column j of a Q at every position is the conv of the input with
        column j of Q as its kernel (its last row as the bias, when a holds the bias's 1)."""
        if q is None or self.columns == "bias":
            return super().rotated_a(q)
        module, folded = self.module, self.columns == "weight+bias"
        blocks = q if q.ndim == 3 else q.unsqueeze(0)  # (groups, in, in), a group's columns its kernels
        inputs = blocks.shape[1] - folded
        kernels = blocks[:, :inputs].mT.reshape(-1, *module.weight.shape[1:])
        bias = blocks[:, -1].reshape(-1) if folded else None
        out = F.conv2d(self.inputs, kernels, bias, module.stride, _padding(module), module.dilation, module.groups)
        return self._by_group(out.flatten(2).transpose(1, 2))


def _squares(values: Tensor) -> Tensor:
    """values², as a product: ``square`` is ``pow``, five times slower on CPU."""
    return values * values


def patch_means(inputs: Tensor, module: nn.Conv2d) -> Tensor:
    """``F.unfold(inputs, …).mean(2)`` of the conv's patches, (N, C·kh·kw), without unfolding.

    Entry (c, i, j) averages the padded input over a grid of the output's size, strided as the
    conv is, offset by (i, j) times its dilation. The grid is a product of a row grid and a
    column grid, so the sums are R_hᵀ X R_w per example and channel, R a 0/1 matrix that marks
    which input rows (columns) each kernel offset reads (:func:`tap_selector`; padding reads
    zeros, so it has no rows). Two thin products that read the input once: on CPU 9–103 times
    faster than unfolding on ResNet shapes (``python -m opcomp.bench.patches``,
    docs/performance.md); the same values up to rounding."""
    n, c, h, w = inputs.shape
    padding = _pair(_padding(module))
    geometry = (module.kernel_size, module.stride, padding, module.dilation)
    rows, out_h = tap_selector(h, *(dim[0] for dim in geometry), inputs.dtype, inputs.device)
    columns, out_w = tap_selector(w, *(dim[1] for dim in geometry), inputs.dtype, inputs.device)
    sums = rows.T @ (inputs @ columns)  # (N, C, kh, kw)
    return sums.reshape(n, -1) / (out_h * out_w)


@lru_cache(maxsize=256)
def tap_selector(
    size: int, kernel: int, stride: int, padding: int, dilation: int, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, int]:
    """R (size, kernel): R[x, i] = 1 when kernel offset i reads input position x at some output
    position along one dimension; and the output's length there. Made on the host and moved
    once: it is kept per geometry, dtype and device."""
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    selector = torch.zeros(size, kernel, dtype=dtype)
    for offset in range(kernel):
        read = offset * dilation - padding + stride * torch.arange(out)
        selector[read[(read >= 0) & (read < size)], offset] = 1.0
    return selector.to(device), out


def _with_bias_column(a: Tensor, columns: Columns) -> Tensor:
    """Inputs (…, in) as A's columns: with the bias's 1 appended, or that 1 alone."""
    ones = torch.ones(*a.shape[:-1], 1, dtype=a.dtype, device=a.device)
    if columns == "bias":
        return ones
    return torch.cat([a, ones], dim=-1) if columns == "weight+bias" else a


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

    def A(self, bf16: bool = False, onto: Average | None = None) -> Tensor:
        return mean_gram(self._rows("a"), self.a_count, bf16, onto)

    def A_diagonal(self) -> Tensor:
        if self.vocabulary:
            ids = torch.cat(self._rows("a"))
            return torch.bincount(ids, minlength=self.vocabulary).to(self.samples[0].d.dtype) / len(ids)
        return mean_square(self._rows("a"), self.a_count)

    @property
    def _g_count(self) -> float:
        """G's divisor: N over the square of the gradients' scale (every statistic is quadratic in d)."""
        return self.examples / self.gradient_scale**2

    def G(self, bf16: bool = False, onto: Average | None = None) -> Tensor:
        return mean_gram(self._rows("d"), self._g_count, bf16, onto)

    def G_diagonal(self) -> Tensor:
        return mean_square(self._rows("d"), self._g_count)

    def eigen_scale(self, q_g: Tensor | None, q_a: Tensor | None) -> Tensor:
        """E_n[(Q_Gᵀ ∇W_n Q_A)²] over per-example gradients ∇W_n = Σ_s d_ns a_nsᵀ, (out, in).

        Positions are summed before squaring: that is what makes it the per-example gradient of a
        conv or a sequence model, not of its rows. A missing Q (a factor kept diagonal, an
        Embedding's A) is the identity.
        """
        if self.vocabulary:
            return self._embedding_scale(q_g)
        total = None
        for sample in self.samples:
            d = sample.d if q_g is None else rotated(sample.d, q_g)
            a = sample.rotated_a(q_a)
            if d.ndim == 4:  # a grouped conv: (N, S, groups, ·), one block per group
                chunk = max(1, CHUNK // max(1, d.shape[2] * d.shape[3] * a.shape[3]))
                part = sum(
                    _squares(torch.einsum("nsko,nski->nkoi", d[i : i + chunk], a[i : i + chunk])).sum(0)
                    for i in range(0, len(d), chunk)
                )
            elif d.shape[1] == 1:  # no sharing: Σ_n (d_n²)(a_n²)ᵀ in one product
                part = (d[:, 0] * d[:, 0]).T @ (a[:, 0] * a[:, 0])
            else:
                chunk = max(1, CHUNK // max(1, d.shape[2] * a.shape[2]))
                part = sum(
                    _squares(torch.einsum("nso,nsi->noi", d[i : i + chunk], a[i : i + chunk])).sum(0)
                    for i in range(0, len(d), chunk)
                )
            total = part if total is None else total + part
        return total / self._g_count

    def _embedding_scale(self, q_g: Tensor | None) -> Tensor:
        """Rows of one example that hit one token add up before squaring (X is (dim, vocabulary))."""
        dim = self.samples[0].d.shape[-1]
        total = torch.zeros(self.vocabulary, dim, dtype=self.samples[0].d.dtype, device=self.samples[0].d.device)
        for sample in self.samples:
            d = (sample.d if q_g is None else sample.d @ q_g).flatten(0, 1)
            example = torch.arange(len(sample.a), device=d.device).unsqueeze(1).expand_as(sample.a)
            pairs, which = torch.unique((example * self.vocabulary + sample.a).flatten(), return_inverse=True)
            summed = torch.zeros(len(pairs), d.shape[1], dtype=d.dtype, device=d.device).index_add_(0, which, d)
            total.index_add_(0, pairs % self.vocabulary, summed.square())
        return total.T / self._g_count


def mean_square(blocks: list[Tensor], count: float) -> Tensor:
    """Σ r² / count over the rows of each block, per column (``r * r``: pow(2) is five times slower
    on CPU), the blocks' sums added and divided in place."""
    total = None
    for rows in blocks:
        part = (rows * rows).sum(0)
        total = part if total is None else total.add_(part)
    return total.div_(count)


def mean_gram(blocks: list[Tensor], count: float, bf16: bool, onto: Average | None = None) -> Tensor:
    """Σ rᵀr / count over blocks of rows, in the rows' precision (a grouped layer's rows (N, groups,
    n) give one gram per group, (groups, n, n)). With ``bf16`` each block is rounded to bfloat16
    once and its product comes back rounded to bfloat16; otherwise 1/count lands on whichever is
    smaller, a block or its product.

    ``onto`` = (S, decay), without ``bf16``: decay·S + (1 − decay)·Σ rᵀr / count instead, a new
    tensor made by ``addmm``'s beta and alpha: the step's factor is never formed, divided or mixed
    in a pass of its own (fog's ``opt.step`` on the bench MLP: 30.6 → 28.0 ms, docs/performance.md)."""
    if blocks[0].ndim == 3:  # a grouped layer's rows (N, groups, n): one gram per group
        blocks = [rows.transpose(0, 1) for rows in blocks]
    if onto is not None and not bf16:
        average, decay = onto
        weight = (1 - decay) / count
        batched = blocks[0].ndim == 3
        total = (torch.baddbmm if batched else torch.addmm)(average, blocks[0].mT, blocks[0], beta=decay, alpha=weight)
        for rows in blocks[1:]:
            (total.baddbmm_ if batched else total.addmm_)(rows.mT, rows, alpha=weight)
        return total
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


def layer_kind(module: nn.Module | None) -> Kind | None:
    """Recognise a layer by what it computes, not its exact class: ``nn.Linear`` and every subclass
    (MultiheadAttention's out_proj class, FSDP2's wrapped layers), Hugging Face's ``Conv1D`` (y = x W + b,
    a Linear whose weight is stored transposed), ``nn.Conv2d`` and ``nn.Embedding`` and their subclasses."""
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Linear):
        return "linear"
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, Tensor) and weight.ndim == 2:
        if getattr(module, "nf", None) == weight.shape[1]:  # transformers' Conv1D: weight (in, out)
            return "conv1d"
    return None


def layer_shape(module: nn.Module, kind: Kind) -> tuple[int, int]:
    """(out, in) of the layer's weight as a matrix X acting on inputs: (dim, vocabulary) for an
    Embedding, the stored weight transposed for a Conv1D."""
    weight = module.weight
    if kind == "embedding":
        return weight.shape[1], weight.shape[0]
    if kind == "conv1d":
        return weight.shape[1], weight.shape[0]
    return weight.shape[0], math.prod(weight.shape[1:])  # from the shape: indexing makes a view each call


def matrix_shape(module: nn.Module, kind: Kind, columns: Columns) -> tuple[int, int]:
    """(out, in) of the matrix X a layer node preconditions: the weight's, a bias column counted."""
    out, inputs = layer_shape(module, kind)
    return out, {"weight": inputs, "weight+bias": inputs + 1, "bias": 1}[columns]


def groups_of(module: nn.Module) -> int:
    """A grouped Conv2d's groups (depthwise: one per input channel), 1 for every other layer."""
    return module.groups if isinstance(module, nn.Conv2d) else 1


def block_shape(module: nn.Module, kind: Kind, columns: Columns) -> tuple[int, int, int]:
    """(groups, out, in) of a layer's X as independent blocks: a Conv2d with groups = k computes k
    convolutions side by side, each from its k-th of the input channels to its k-th of the outputs,
    so its X is k blocks of (out/k, in), each with its own A and G. One block for other layers."""
    out, inputs = matrix_shape(module, kind, columns)
    groups = groups_of(module)
    return groups, out // groups, inputs


def factor_shapes(block: tuple[int, int, int], diagonal_in: bool, diagonal_out: bool) -> dict[str, tuple[int, ...]]:
    """The shape of each kind of layer buffer for a layer of ``block`` shape (groups, out, in): a
    grouped layer's carry the groups first; an ungrouped layer's are the plain matrices and vectors."""
    groups, out, inputs = block
    lead = (groups,) if groups > 1 else ()
    return {
        "in_factor": lead + ((inputs,) if diagonal_in else (inputs, inputs)),
        "out_factor": lead + ((out,) if diagonal_out else (out, out)),
        "in_diag": lead + (inputs,),
        "out_diag": lead + (out,),
        "layer_matrix": lead + (out, inputs),
    }


def diagonal_sides(kind: Kind, block: tuple[int, int, int], max_dim: int | None) -> tuple[bool, bool]:
    """(A kept as its diagonal, G kept as its diagonal) for a layer of ``block`` shape (groups, out,
    in): an Embedding's A always (its input is one-hot), and any factor above ``max_dim``, the size
    budget, each group's sizes counted."""
    _, out, inputs = block
    limit = max_dim if max_dim is not None else max(out, inputs)
    return kind == "embedding" or inputs > limit, out > limit


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


def unsupported(module: nn.Module | None) -> str | None:
    """Why the statistics do not cover this layer's configuration (its parameters then fall
    through ``|`` like any other's, with this reason), or None."""
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            return f"Conv2d parameters padded with '{module.padding_mode}' (layer statistics take padding_mode='zeros')"
        if module.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size)):
            return (
                "Conv2d parameters with padding='same' and an even kernel, which pads unevenly "
                "(give the padding as numbers)"
            )
    return None


def statistics(
    module: nn.Module, entries: list[Entry], reduction: Reduction, columns: Columns, sampled: bool
) -> Statistics:
    """The statistics of ``module`` from its captured entries, in the weight's working precision.

    Sampled (Monte Carlo) gradients are per-example already: they start from ∂ℓ_n/∂f_n, not from
    the batch loss, so only the user's gradients are rescaled by the reduction.
    """
    dtype = working_dtype(module.weight.dtype)
    forwards: dict[int, list[Entry]] = {}
    for entry in entries:
        forwards.setdefault(entry.forward, []).append(entry)
    examples = sum(_examples(module, group[0].input) for group in forwards.values())
    scale = examples if reduction == "mean" and not sampled else 1
    samples = []
    for group in forwards.values():  # a layer called twice in one forward shares its weight over both calls
        parts = [_sample(module, e.input, e.sampled if sampled else e.grad, columns, dtype) for e in group]
        if len(parts) == 1:
            samples.append(parts[0])
        else:
            samples.append(Sample(torch.cat([p.a for p in parts], 1), torch.cat([p.d for p in parts], 1)))
    vocabulary = module.num_embeddings if isinstance(module, nn.Embedding) else 0
    key = None if vocabulary else inputs_key(module, entries)
    source = None if key is None else (key, columns, dtype)
    return Statistics(samples, examples, isinstance(module, nn.Conv2d), vocabulary, scale, source)


def inputs_key(module: nn.Module, entries: list[Entry]) -> tuple | None:
    """Which inputs a layer read, and how it takes its rows from them: layers that agree (a
    transformer's query, key and value projections, a gated MLP's gate and up) have one A, formed
    once. An input is known by its memory, layout and version: the same values, not only the same
    shape; a Conv2d's rows depend on its kernel geometry too. None, shared with no other layer,
    when an input cannot be told apart so (a tensor subclass, an inference tensor: no version)."""
    geometry = None
    if isinstance(module, nn.Conv2d):
        geometry = (module.kernel_size, module.dilation, _padding(module), module.stride, module.groups)
    read = []
    for entry in entries:
        values = entry.input
        if type(values) is not Tensor or values.is_inference():
            return None
        place = (values.untyped_storage().data_ptr(), values.storage_offset(), values.shape, values.stride())
        read.append((entry.forward, *place, values._version, values.dtype, values.device))
    return geometry, tuple(read)


def _examples(module: nn.Module, inputs: Tensor) -> int:
    """Examples are dim 0 of the layer's input, unless the input is unbatched (one example)."""
    if isinstance(module, nn.Conv2d):
        unbatched = 3
    elif isinstance(module, nn.Embedding):
        unbatched = 0
    else:
        unbatched = 1
    return 1 if inputs.ndim == unbatched else inputs.shape[0]


def _sample(module: nn.Module, inputs: Tensor, grad: Tensor, columns: Columns, dtype: torch.dtype) -> Sample:
    if isinstance(module, nn.Embedding):
        return Sample(_shared(inputs.unsqueeze(-1), module)[..., 0], _shared(grad, module).to(dtype))
    if isinstance(module, nn.Conv2d):
        return ConvSample(module, inputs, grad, columns, dtype)
    a, d = _shared(inputs.to(dtype), module), _shared(grad.to(dtype), module)
    return Sample(_with_bias_column(a, columns), d)


def _shared(values: Tensor, module: nn.Module) -> Tensor:
    """(N, …, features) as (N, S, features), every leading dimension after the first shared; an
    unbatched input (features,) is one example. Explicit shapes, so empty layers work too."""
    if values.ndim == 1:
        return values.reshape(1, 1, -1) if values.numel() else values.reshape(1, 1, 0)
    if values.ndim == 2:
        return values.unsqueeze(1)
    return values.flatten(1, -2)


def _padding(module: nn.Conv2d):
    if module.padding == "valid":
        return 0
    if module.padding == "same":  # torch allows it with stride 1 only; d·(k−1) is even (checked at build)
        return tuple(d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size))
    return module.padding
