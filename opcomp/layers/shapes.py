"""The shapes of a layer's matrix X and of the buffers its statistics keep."""

from __future__ import annotations

from typing import Literal

Columns = Literal["weight", "weight+bias", "bias"]
"""What a layer's matrix X holds: its weight, the weight with the bias as a last column, or the bias alone."""


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
