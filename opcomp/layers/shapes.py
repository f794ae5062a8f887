"""The shapes of a layer's matrix X and of the buffers its statistics keep."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Columns = Literal["weight", "weight+bias", "bias"]
"""What a layer's matrix X holds: its weight, the weight with the bias as a last column, or the bias alone."""


@dataclass(frozen=True)
class FactorForm:
    """How a factor of ``side`` × ``side`` is kept: whole (``block`` None), as its diagonal
    (``block`` 1), or block-diagonal: ``count`` blocks of ``block`` × ``block`` along the
    diagonal, full statistics inside each and nothing between them (O(block · side) memory). The
    last block is zero-padded to the others' size, so the blocks are one batch: (count, block, block)."""

    side: int
    block: int | None = None

    @classmethod
    def within(cls, side: int, limit: int | None) -> FactorForm:
        """Whole up to ``limit``, as blocks of ``limit`` beyond it (its diagonal for a limit of 1)."""
        return cls(side, None if limit is None or side <= limit else limit)

    @classmethod
    def diagonal_of(cls, side: int) -> FactorForm:
        return cls(side, 1)

    @property
    def dense(self) -> bool:
        """Kept as one matrix (whole)."""
        return self.block is None

    @property
    def diagonal(self) -> bool:
        return self.block == 1

    @property
    def blocked(self) -> bool:
        return self.block is not None and self.block > 1

    @property
    def count(self) -> int:
        return 1 if self.block is None else math.ceil(self.side / self.block)

    @property
    def padded(self) -> int:
        """The side with the last block padded: count · block."""
        return self.side if self.block is None else self.count * self.block

    @property
    def last(self) -> int:
        """The last block's own size (the rest of it is padding)."""
        return self.side if self.block is None else self.side - (self.count - 1) * self.block

    def shape(self) -> tuple[int, ...]:
        """The factor's shape: (side,) kept diagonal, (side, side) whole, (count, block, block) in blocks."""
        if self.diagonal:
            return (self.side,)
        return (self.count, self.block, self.block) if self.blocked else (self.side, self.side)

    def nbytes(self, element: int = 4) -> int:
        return element * math.prod(self.shape())

    def describe(self) -> str:
        if self.diagonal:
            return "diagonal"
        return f"{self.count} blocks of {self.block}" if self.blocked else "whole"


def factor_shapes(block: tuple[int, int, int], in_form: FactorForm, out_form: FactorForm) -> dict[str, tuple[int, ...]]:
    """The shape of each kind of layer buffer for a layer of ``block`` shape (groups, out, in), its
    factors kept in ``in_form`` and ``out_form``: a grouped layer's carry the groups first; an
    ungrouped layer's are the plain matrices and vectors."""
    groups, out, inputs = block
    lead = (groups,) if groups > 1 else ()
    return {
        "in_factor": lead + in_form.shape(),
        "out_factor": lead + out_form.shape(),
        "in_diag": lead + (inputs,),
        "out_diag": lead + (out,),
        "layer_matrix": lead + (out, inputs),
    }
