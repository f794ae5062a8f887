"""Saved optimizer state, checked before it is loaded: every buffer must have the shape the node
keeps for that parameter (or layer), so a state_dict of another model is refused whole instead of
failing half-way through a later step."""

from __future__ import annotations

from torch import Tensor, nn

from opcomp.errors import OpcompError
from opcomp.graph import Node
from opcomp.ops.registry import StateBuffer
from opcomp.plan import LayerPlan


def expected_shape(buffer: StateBuffer, param: Tensor, layer: LayerPlan | None) -> tuple[int, ...]:
    """The shape ``buffer`` has for ``param``; layer buffers take theirs from the layer's matrix X."""
    if buffer.shape == "param":
        return tuple(param.shape)
    if buffer.shape == "scalar":
        return ()
    out, columns = layer.matrix_shape
    diagonal = isinstance(layer.module, nn.Embedding)  # its input factor is a diagonal
    return {
        "in_factor": (columns,) if diagonal else (columns, columns),
        "out_factor": (out, out),
        "in_diag": (columns,),
        "out_diag": (out,),
        "layer_matrix": (out, columns),
    }[buffer.shape]


def check_buffers(where: str, node: Node, param: Tensor, layer: LayerPlan | None, buffers: dict) -> None:
    """Every saved buffer of ``node`` is one it declares, with the shape it keeps here."""
    declared = {b.name: b for b in node.spec.state}
    for name, tensor in buffers.items():
        if name not in declared:
            raise OpcompError(
                f"the saved state of {where} has a buffer '{name}' for '{node.op}', which keeps "
                f"{', '.join(sorted(declared)) or 'no state'}: it was not saved by this version of opcomp"
            )
        if not isinstance(tensor, Tensor):
            raise OpcompError(f"the saved state of {where}: '{node.op}' buffer '{name}' is not a tensor")
        expected = expected_shape(declared[name], param, layer)
        if tuple(tensor.shape) != expected:
            raise OpcompError(
                f"the saved state of {where} does not fit this model: '{node.op}' buffer '{name}' has shape "
                f"{tuple(tensor.shape)}, here it is {expected} — the state_dict belongs to parameters of "
                "other shapes (or another order of parameters)"
            )
