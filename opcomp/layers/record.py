"""One layer running a layer node: the record the plan makes at build and the kernels read at each step.

:class:`Layer` holds what building decides (the module, its kind, which of its parameters run the
node, the shapes of X and of its buffers); :class:`LayerSlot` is that record at one step, with
where its weight and bias sit in the step's flat value lists and the node's state for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from opcomp.graph import Node
from opcomp.layers.kinds import LayerKind
from opcomp.layers.shapes import Columns, FactorForm, factor_shapes
from opcomp.state import peek, possibly_taken


def matrix_shape(module: nn.Module, kind: LayerKind, columns: Columns) -> tuple[int, int]:
    """(out, in) of the matrix X a layer node preconditions: the weight's, a bias column counted."""
    out, inputs = kind.shape(module)
    return out, {"weight": inputs, "weight+bias": inputs + 1, "bias": 1}[columns]


def block_shape(module: nn.Module, kind: LayerKind, columns: Columns) -> tuple[int, int, int]:
    """(groups, out, in) of a layer's X as independent blocks: a Conv2d with groups = k computes k
    convolutions side by side, each from its k-th of the input channels to its k-th of the outputs,
    so its X is k blocks of (out/k, in), each with its own A and G. One block for other layers."""
    out, inputs = matrix_shape(module, kind, columns)
    groups = kind.groups(module)
    return groups, out // groups, inputs


def factor_limit(options) -> int | None:
    """The largest factor side a layer node keeps whole: its ``block`` when set, else its
    ``max_dim`` (the size budget); a longer factor is kept as diagonal blocks of that size."""
    limits = [getattr(options, "block", 0) or None, getattr(options, "max_dim", None)]
    limits = [limit for limit in limits if limit is not None]
    return min(limits) if limits else None


def factor_forms(kind: LayerKind, block: tuple[int, int, int], limit: int | None) -> tuple[FactorForm, FactorForm]:
    """How A and G are kept for a layer of ``block`` shape (groups, out, in), each group's sizes
    counted: a one-hot input's A as its diagonal (it is diagonal), any factor longer than
    ``limit`` as blocks of ``limit``, the rest whole."""
    _, out, inputs = block
    a_form = FactorForm.diagonal_of(inputs) if kind.one_hot else FactorForm.within(inputs, limit)
    return a_form, FactorForm.within(out, limit)


@dataclass
class Layer:
    """A layer running a layer node: its weight and bias, if they run the node too."""

    module: nn.Module
    name: str
    node: Node
    kind: LayerKind
    weight: Tensor | None = None
    bias: Tensor | None = None

    @property
    def columns(self) -> Columns:
        """What X holds: the weight, the weight with the bias folded in as a last column (the bias
        runs the node too), or the bias alone (it runs the node, the weight does not)."""
        if self.weight is None:
            return "bias"
        return "weight+bias" if self.bias is not None and not self.kind.one_hot else "weight"

    @property
    def block_shape(self) -> tuple[int, int, int]:
        """(groups, out, in) of the layer's X: (dim, vocabulary) for an Embedding, a bias column
        counted; a grouped Conv2d's X is groups independent blocks, each with its own A and G."""
        return block_shape(self.module, self.kind, self.columns)

    @property
    def forms(self) -> tuple[FactorForm, FactorForm]:
        """How A and G are kept: whole, diagonal (an Embedding's A) or in blocks (over the node's limit)."""
        return factor_forms(self.kind, self.block_shape, factor_limit(self.node.options))

    def buffer_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each kind of layer buffer (``StateBuffer.shape``) for this layer."""
        return factor_shapes(self.block_shape, *self.forms)

    @property
    def owner(self) -> Tensor:
        """The parameter whose state holds the layer's statistics."""
        return self.weight if self.weight is not None else self.bias

    def due(self, state) -> bool:
        """Whether this step feeds the layer's statistics (every ``update_every`` steps of its node);
        while the last step's decision is on its way to the host, whether it may."""
        kept = peek(state[self.owner], self.node.state_key) if self.owner in state else {}
        return any(count % self.node.options.update_every == 0 for count in possibly_taken(kept))


@dataclass
class LayerSlot:
    """A :class:`Layer` at one step: where its weight and bias sit in the flat value lists (None
    when one has no gradient this step), and the node's state for the layer."""

    layer: Layer
    weight: int | None
    bias: int | None
    state: dict

    @property
    def module(self) -> nn.Module:
        return self.layer.module

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def kind(self) -> LayerKind:
        return self.layer.kind

    @property
    def columns(self) -> Columns:
        return self.layer.columns

    @property
    def block_shape(self) -> tuple[int, int, int]:
        return self.layer.block_shape

    @property
    def grouped(self) -> bool:
        return self.kind.groups(self.module) > 1

    @property
    def forms(self) -> tuple[FactorForm, FactorForm]:
        """How A and G are kept (:attr:`Layer.forms`)."""
        return self.layer.forms
