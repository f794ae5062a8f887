"""What a layer computes, as its statistics see it: one helper per kind of layer, chosen through one registry.

A layer is recognised by what it computes, not its exact class: ``nn.Linear`` and every subclass
(MultiheadAttention's out_proj class, FSDP2's wrapped layers), Hugging Face's ``Conv1D`` (y = x W + b,
a Linear whose weight is stored transposed), ``nn.Conv2d`` (grouped and depthwise too) and
``nn.Embedding`` and their subclasses. Supporting another kind means one more :class:`LayerKind`
in :data:`KINDS`: its matrix X, its examples and its rows (:mod:`opcomp.layers.samples`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from opcomp.layers.samples import ConvSample, Sample, conv_padding, shared, with_bias_column
from opcomp.layers.shapes import Columns
from opcomp.layers.summed import ConvSums


class LayerKind:
    """A kind of layer: how its weight is a matrix X = (out, in) acting on its inputs, what one
    example of its input is, and how its micro-batches become rows of A and G."""

    name = ""
    transposed = False  # the stored weight is Xᵀ (an Embedding's (vocabulary, dim), a Conv1D's (in, out))
    one_hot = False  # the input is one-hot (token ids): A is diagonal, and no bias is folded into X
    head = True  # may be the model's output head, or a hidden layer's weight (an Embedding is neither)
    reduce = False  # one row per example (positions averaged), not one per position
    unbatched = 1  # the ndim of an input that is one example

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def shape(self, module: nn.Module) -> tuple[int, int]:
        """(out, in) of the weight as X: from the shape (indexing makes a view each call)."""
        weight = module.weight
        if self.transposed:
            return weight.shape[1], weight.shape[0]
        return weight.shape[0], math.prod(weight.shape[1:])

    def groups(self, module: nn.Module) -> int:
        """Independent blocks of X, each with its own A and G (a grouped Conv2d's groups)."""
        return 1

    def examples(self, inputs: Tensor) -> int:
        """Examples are dim 0 of the layer's input, unless the input is unbatched (one example)."""
        return 1 if inputs.ndim == self.unbatched else inputs.shape[0]

    def geometry(self, module: nn.Module) -> tuple | None:
        """What besides its input decides the layer's rows (a convolution's kernel), for telling
        which layers read one input alike."""
        return None

    def unsupported(self, module: nn.Module) -> str | None:
        """Why the statistics do not cover this layer's configuration, or None."""
        return None

    def summing(self, module: nn.Module) -> Callable[[Tensor, Tensor], object] | None:
        """(input, output gradient) -> the rows summed over positions, where KFAC reads only those
        and the capture may form them as the gradient arrives (:mod:`opcomp.layers.summed`)."""
        return None

    def sample(self, module: nn.Module, inputs: Tensor, grad: Tensor, columns: Columns, dtype: torch.dtype) -> Sample:
        """One micro-batch as rows: (N, S, in) inputs, the bias's 1 appended as ``columns`` says,
        and (N, S, out) output gradients."""
        a, d = shared(inputs.to(dtype), module), shared(grad.to(dtype), module)
        return Sample(with_bias_column(a, columns), d)


class Linear(LayerKind):
    name = "linear"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)


class Conv1D(LayerKind):
    """transformers' Conv1D: y = x W + b with W stored (in, out)."""

    name = "conv1d"
    transposed = True

    def matches(self, module: nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        return (
            type(module).__name__ == "Conv1D"
            and isinstance(weight, Tensor)
            and weight.ndim == 2
            and getattr(module, "nf", None) == weight.shape[1]
        )


class Conv2d(LayerKind):
    """A Conv2d's X is (out, in·kh·kw); with groups = k it is k blocks of (out/k, in/k·kh·kw)."""

    name = "conv2d"
    reduce = True
    unbatched = 3

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Conv2d)

    def groups(self, module: nn.Module) -> int:
        return module.groups

    def geometry(self, module: nn.Module) -> tuple:
        return (module.kernel_size, module.dilation, conv_padding(module), module.stride, module.groups)

    def unsupported(self, module: nn.Module) -> str | None:
        if module.padding_mode != "zeros":
            return f"Conv2d parameters padded with '{module.padding_mode}' (layer statistics take padding_mode='zeros')"
        if module.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size)):
            return (
                "Conv2d parameters with padding='same' and an even kernel, which pads unevenly "
                "(give the padding as numbers)"
            )
        return None

    def sample(self, module: nn.Module, inputs: Tensor, grad: Tensor, columns: Columns, dtype: torch.dtype) -> Sample:
        return ConvSample(module, inputs, grad, columns, dtype)

    def summing(self, module: nn.Module) -> Callable[[Tensor, Tensor], object]:
        return partial(ConvSums.of, module)


class Embedding(LayerKind):
    """An Embedding's X is (dim, vocabulary); its input is one-hot, so ``a`` holds token ids."""

    name = "embedding"
    transposed = True
    one_hot = True
    head = False
    unbatched = 0

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def sample(self, module: nn.Module, inputs: Tensor, grad: Tensor, columns: Columns, dtype: torch.dtype) -> Sample:
        return Sample(shared(inputs.unsqueeze(-1), module)[..., 0], shared(grad, module).to(dtype))


KINDS: tuple[LayerKind, ...] = (Embedding(), Conv2d(), Linear(), Conv1D())
"""Every kind opcomp captures statistics for, in the order they are tried."""


def kind_of(module: nn.Module | None) -> LayerKind | None:
    """The kind of ``module``, or None for a layer opcomp takes no statistics of."""
    if module is None:
        return None
    return next((kind for kind in KINDS if kind.matches(module)), None)


def unsupported(module: nn.Module | None) -> str | None:
    """Why the statistics do not cover this layer's configuration (its parameters then fall
    through ``|`` like any other's, with this reason), or None."""
    kind = kind_of(module)
    return None if kind is None else kind.unsupported(module)
