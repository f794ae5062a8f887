"""A Conv2d's micro-batch summed over its positions as soon as its output gradient arrives.

KFAC and diagonal KFAC read a conv's rows reduced (:mod:`opcomp.layers.samples`): each example's
patch averaged over the output positions, its output gradient summed over them. The capture
forms those two small matrices in the layer's gradient hook (``Capture.summed``)
and lets go of the input and the gradient, the largest tensors a CNN's step would otherwise hold
from the backward to ``opt.step`` (ResNet-18 at 32 images of 224²: 570 MB, against 4.4 summed).
Held, they also slow the backward, which then takes fresh memory from the system: the plain CNN of
``python -m opcomp.bench.kfac`` took 47.7 ms for forward and backward holding both, 42.4 holding
neither (docs/performance.md). EKFAC's correction reads every position, so a layer that runs it
keeps its sample whole.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from opcomp.layers.samples import ConvSample, Sample, by_group, patch_means, with_bias_column
from opcomp.layers.shapes import Columns
from opcomp.precision import working_dtype


@dataclass
class ConvSums:
    """One micro-batch of a Conv2d as KFAC reads it, in the layer's working precision."""

    module: nn.Conv2d
    means: Tensor  # (N, C·kh·kw): each example's patch averaged over the output positions
    sums: Tensor  # (N, out): each example's output gradient summed over them
    positions: int
    source: tuple | None  # the input it was read from (:func:`identity`)

    @classmethod
    def of(cls, module: nn.Conv2d, inputs: Tensor, grad: Tensor) -> ConvSums:
        """The values :class:`~opcomp.layers.samples.ConvSample`'s reduced rows hold, formed alike."""
        sample = ConvSample(module, inputs, grad, "weight", working_dtype(module.weight.dtype))
        means = patch_means(sample.inputs, module)
        return cls(module, means, sample.grad.sum((2, 3)), sample.positions, identity(inputs))

    @property
    def examples(self) -> int:
        return self.means.shape[0]


def joined(parts: list[ConvSums]) -> ConvSums:
    """A layer called more than once in one forward shares its weight over every call's positions:
    the patches' means weighted by each call's positions, the gradients' sums added."""
    if len(parts) == 1:
        return parts[0]
    positions = sum(part.positions for part in parts)
    means = sum(part.means * (part.positions / positions) for part in parts)
    return ConvSums(parts[0].module, means, sum(part.sums for part in parts), positions, None)


class SummedConvSample(Sample):
    """:class:`ConvSums` as a sample with ``columns``: only its reduced rows exist."""

    def __init__(self, sums: ConvSums, columns: Columns):
        self.sums, self.columns = sums, columns

    def rows(self, side: str, reduce: bool) -> Tensor:
        if not reduce:
            raise ValueError("a conv sample summed at capture has no rows per position")
        if side == "d":
            return by_group(self.sums.sums, self.sums.module.groups)
        return with_bias_column(by_group(self.sums.means, self.sums.module.groups), self.columns)

    def count(self, reduce: bool) -> int:
        return self.sums.examples

    @property
    def a(self) -> Tensor:
        raise AttributeError("a conv sample summed at capture keeps no patches (Capture.summed)")

    @property
    def d(self) -> Tensor:
        raise AttributeError("a conv sample summed at capture keeps no gradients per position (Capture.summed)")


def identity(values: Tensor) -> tuple | None:
    """Which values a layer read: its memory, layout and version (equal for layers that read one
    input alike); None when they cannot be told apart so (a tensor subclass, an inference tensor)."""
    if type(values) is not Tensor or values.is_inference():
        return None
    place = (values.untyped_storage().data_ptr(), values.storage_offset(), values.shape, values.stride())
    return (*place, values._version, values.dtype, values.device)
