"""A layer's micro-batches in one form, whatever the layer: the rows its statistics are made of.

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

from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.utils import _pair

from opcomp.layers.blocks import rows_times
from opcomp.layers.shapes import Columns, FactorForm


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

    def rotated_a(self, q: Tensor | None, form: FactorForm) -> Tensor:
        """a Q, (N, S, in) (a grouped layer's (N, S, groups, in), each group by its Q; Q in
        blocks, each block); a missing Q is the identity."""
        return self.a if q is None else rows_times(self.a, q, form)


class ConvSample(Sample):
    """A Conv2d's micro-batch, formed as far as it is used (``a`` and ``d`` on first use). Its
    reduced rows (what KFAC and diagonal KFAC read) come without unfolding the input: each entry
    of a patch averaged over the output positions is :func:`patch_means`, and d summed over them
    a sum over the gradient's spatial dimensions; EKFAC's patches rotated by Q_A are a
    convolution (:meth:`rotated_a`), or, with fewer output channels than positions, each
    example's gradient (:meth:`example_gradients`) is rotated instead.
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
        return by_group(values, self.groups)

    @cached_property
    def a(self) -> Tensor:
        return self.patches(0, len(self.inputs))

    def patches(self, start: int, stop: int) -> Tensor:
        """``a`` of examples ``start`` to ``stop``."""
        module = self.module
        patches = F.unfold(
            self.inputs[start:stop],
            module.kernel_size,
            dilation=module.dilation,
            padding=conv_padding(module),
            stride=module.stride,
        )
        # (n, positions, C·kh·kw), grouped (n, positions, groups, C/groups·kh·kw)
        return with_bias_column(self._by_group(patches.transpose(1, 2)), self.columns)

    @property
    def positions(self) -> int:
        return self.grad.shape[2] * self.grad.shape[3]

    @property
    def width(self) -> int:
        """Columns of ``a``: a patch (of one group), and the bias's 1 when it is folded in."""
        return self.module.weight[0].numel() + (self.columns == "weight+bias")

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
        return with_bias_column(means, self.columns)

    def count(self, reduce: bool) -> int:
        examples, _, height, width = self.grad.shape
        return examples if reduce else examples * height * width

    def example_gradients(self, columns: Tensor, start: int, stop: int) -> Tensor:
        """Σ_s d_ns a_nsᵀ, the weight gradient of each example ``start`` to ``stop`` (n, out, C·kh·kw)
        of an ungrouped conv, for output gradients ``columns`` (n, out, S) of those examples (rotated
        or not), without unfolding the patches: the conv's own weight-gradient kernel, the examples
        as its groups. 0.38–0.97 the time of unfolding and multiplying
        (``python -m opcomp.bench.example_gradients``)."""
        module, inputs = self.module, self.inputs[start:stop]
        examples, channels, height, width = inputs.shape
        out = columns.shape[1]
        gradients = torch.nn.grad.conv2d_weight(
            inputs.reshape(1, examples * channels, height, width),
            (examples * out, *module.weight.shape[1:]),
            columns.reshape(1, examples * out, *self.grad.shape[2:]),
            module.stride,
            conv_padding(module),
            module.dilation,
            groups=examples,
        )
        return gradients.reshape(examples, out, -1)

    def rotated_a(self, q: Tensor | None, form: FactorForm) -> Tensor:
        """a Q without unfolding: column j of a Q at every position is the conv of the input with
        column j of Q as its kernel (its last row as the bias, when a holds the bias's 1). A Q in
        blocks rotates the unfolded patches block by block instead. Channels last: the output comes
        as (N, positions, in) directly, and the conv is faster so (docs/performance.md)."""
        if q is None or self.columns == "bias" or form.blocked:
            return super().rotated_a(q, form)
        module, folded = self.module, self.columns == "weight+bias"
        blocks = q if q.ndim == 3 else q.unsqueeze(0)  # (groups, in, in), a group's columns its kernels
        inputs = blocks.shape[1] - folded
        kernels = blocks[:, :inputs].mT.reshape(-1, *module.weight.shape[1:])
        bias = blocks[:, -1].reshape(-1) if folded else None
        out = F.conv2d(
            self.inputs.contiguous(memory_format=torch.channels_last),
            kernels.contiguous(memory_format=torch.channels_last),
            bias,
            module.stride,
            conv_padding(module),
            module.dilation,
            module.groups,
        )
        return self._by_group(out.permute(0, 2, 3, 1).flatten(1, 2))


def patch_means(inputs: Tensor, module: nn.Conv2d) -> Tensor:
    """``F.unfold(inputs, …).mean(2)`` of the conv's patches, (N, C·kh·kw), without unfolding.

    Entry (c, i, j) averages the padded input over a grid of the output's size, strided as the
    conv is, offset by (i, j) times its dilation. The grid is a product of a row grid and a
    column grid, so the sums are R_hᵀ X R_w per example and channel, R a 0/1 matrix that marks
    which input rows (columns) each kernel offset reads (:func:`tap_selector`; padding reads
    zeros, so it has no rows). On a small map they are one product with R_h ⊗ R_w
    (:func:`tap_sums_in_one`, :data:`ONE_PRODUCT`), on a larger one sums over the strides' phases
    (:func:`tap_sums_by_phases`), about one pass over the input; on CPU 9–100 times faster than
    unfolding on ResNet shapes (``python -m opcomp.bench.patches``, docs/performance.md); the same
    values up to rounding."""
    h, w = inputs.shape[-2:]
    rows, columns, positions = selectors(inputs, module)
    if h * w * rows.shape[1] * columns.shape[1] <= ONE_PRODUCT:
        return tap_sums_in_one(inputs, module) / positions
    return tap_sums_by_phases(inputs, module) / positions


ONE_PRODUCT = 1 << 10
"""Entries of R_h ⊗ R_w up to which the tap sums are that one product: a small map's phase sums
cost their dozen small ops more than the product's kh·kw multiply-adds per input value (on the
small ResNet's 2² to 8² maps one product takes 0.1–0.6 of their time), a larger map's product
costs more than their one pass (16² maps: 1.4 times their time, ResNet-18's 56²: 2.5–4.7 times);
``python -m opcomp.bench.patches``, AMD EPYC."""


def selectors(inputs: Tensor, module: nn.Conv2d) -> tuple[Tensor, Tensor, int]:
    """R_h, R_w (:func:`tap_selector`) of the conv's geometry on ``inputs``, and its output positions."""
    h, w = inputs.shape[-2:]
    rows, out_h = tap_selector(h, *geometry(module, 0), inputs.dtype, inputs.device)
    columns, out_w = tap_selector(w, *geometry(module, 1), inputs.dtype, inputs.device)
    return rows, columns, out_h * out_w


def geometry(module: nn.Conv2d, dim: int) -> tuple[int, int, int, int]:
    """Kernel, stride, padding and dilation of the conv along ``dim`` (0: rows, 1: columns)."""
    return tuple(
        value[dim] for value in (module.kernel_size, module.stride, _pair(conv_padding(module)), module.dilation)
    )


def tap_sums_in_one(inputs: Tensor, module: nn.Conv2d) -> Tensor:
    """Σ over each kernel offset's grid, (N, C·kh·kw), as one product: X (N, C, h·w) by R_h ⊗ R_w
    (h·w, kh·kw)."""
    n, c, h, w = inputs.shape
    rows, columns, _ = selectors(inputs, module)
    return (inputs.reshape(n, c, h * w) @ kronecker(rows, columns)).reshape(n, -1)


def tap_sums_by_phases(inputs: Tensor, module: nn.Conv2d) -> Tensor:
    """The same sums from the strides' phases: with R = Π Φ + S Ψ along each dimension
    (:func:`phase_split`), R_hᵀ X R_w = M_hᵀ K M_w for M = [Φ; Ψ] and the small core K = [Π_h
    S_h]ᵀ X [Π_w S_w] (N, C, s_h + b_h, s_w + b_w): X summed by row phase and its few border rows
    taken (long contiguous runs, the one pass over the input), then the same along the columns of
    what is left. The thin products R_hᵀ (X R_w) read the input as kw-wide rows, at a small
    product's poor rate: 1.3–4 times slower on maps of 16² and more."""
    n, c, h, w = inputs.shape
    (border_h, mix_h, whole_h), (border_w, mix_w, whole_w) = (
        phase_split(size, *geometry(module, dim), inputs.dtype, inputs.device) for dim, size in ((0, h), (1, w))
    )
    stride_h, stride_w = module.stride
    by_row = torch.cat([phase_sums(inputs, 2, whole_h, stride_h), inputs.index_select(2, border_h)], 2)
    core = torch.cat([phase_sums(by_row, 3, whole_w, stride_w), by_row.index_select(3, border_w)], 3)
    return (core.reshape(n, c, -1) @ kronecker(mix_h, mix_w)).reshape(n, -1)


def phase_sums(values: Tensor, dim: int, whole: int, stride: int) -> Tensor:
    """Σ over the first ``whole`` positions of ``dim`` (a multiple of ``stride``) by phase
    (position mod stride): that dimension becomes ``stride`` long."""
    return values.narrow(dim, 0, whole).unflatten(dim, (whole // stride, stride)).sum(dim)


@lru_cache(maxsize=256)
def phase_split(
    size: int, kernel: int, stride: int, padding: int, dilation: int, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor, int]:
    """R (:func:`tap_selector`) as Π Φ + S Ψ along one dimension. Π (size, stride) marks each of the
    first ``whole`` positions (size rounded down to whole strides) by its phase; Φ (stride, kernel)
    each offset's phase, the one every position of its grid has; S picks the few positions where R
    and Π Φ differ (the padding's side of a grid, past a grid's end, past ``whole``) and Ψ is R − Π Φ
    there. Returns S's positions, [Φ; Ψ] and ``whole``; kept per geometry, dtype and device."""
    selector, _ = tap_selector(size, kernel, stride, padding, dilation, dtype, torch.device("cpu"))
    whole = size - size % stride
    phases = torch.zeros(stride, kernel, dtype=dtype)
    for offset in range(kernel):
        if selector[:, offset].any():
            phases[(offset * dilation - padding) % stride, offset] = 1.0
    spread = torch.zeros(size, stride, dtype=dtype)
    spread[torch.arange(whole), torch.arange(whole) % stride] = 1.0
    difference = selector - spread @ phases
    border = difference.any(1).nonzero().flatten()
    return border.to(device), torch.cat([phases, difference[border]]).to(device), whole


@lru_cache(maxsize=256)
def kronecker(rows: Tensor, columns: Tensor) -> Tensor:
    """R_h ⊗ R_w (or [Φ; Ψ]_h ⊗ [Φ; Ψ]_w), kept beside the matrices it is made of (themselves kept
    per geometry)."""
    return torch.kron(rows, columns)


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


def by_group(values: Tensor, groups: int) -> Tensor:
    """(…, groups·n) as (…, groups, n) for a grouped conv (channels are group-major); as is otherwise."""
    return values if groups == 1 else values.unflatten(-1, (groups, -1))


def with_bias_column(a: Tensor, columns: Columns) -> Tensor:
    """Inputs (…, in) as A's columns: with the bias's 1 appended, or that 1 alone."""
    ones = torch.ones(*a.shape[:-1], 1, dtype=a.dtype, device=a.device)
    if columns == "bias":
        return ones
    return torch.cat([a, ones], dim=-1) if columns == "weight+bias" else a


def shared(values: Tensor, module: nn.Module) -> Tensor:
    """(N, …, features) as (N, S, features), every leading dimension after the first shared; an
    unbatched input (features,) is one example. Explicit shapes, so empty layers work too."""
    if values.ndim == 1:
        return values.reshape(1, 1, -1) if values.numel() else values.reshape(1, 1, 0)
    if values.ndim == 2:
        return values.unsqueeze(1)
    return values.flatten(1, -2)


def conv_padding(module: nn.Conv2d):
    if module.padding == "valid":
        return 0
    if module.padding == "same":  # torch allows it with stride 1 only; d·(k−1) is even (checked at build)
        return tuple(d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size))
    return module.padding
