"""The capture inside compiled graphs: custom ops that torch.compile keeps in one graph.

Dynamo cannot trace the eager capture's Python (records appended to lists, a tensor hook on each
layer output): every hooked layer broke the graph, and arming the capture between steps
recompiled it. Under torch.compile the hooks call these ops instead. Dynamo treats an op as
opaque, so its body runs when the compiled graph runs and asks then whether the capture is
armed; the traced graph holds only integers (the capture's number, the layer's slot), the same
every step. :func:`layer_output` stands between a layer and the rest of the model: it records
the layer's input, and its backward hands the output's gradient to :func:`layer_grad`, which
records that. :func:`model_forward` marks where a forward of the model starts and ends, so the
micro-batches of an accumulated step stay apart.

The ops keep copies, not references: a compiled graph may reuse a buffer's memory once its
graph is done with it. What that costs: a copy of each hooked layer's output every step (an op
returns fresh tensors), and of its input and output gradient on steps whose statistics are due.
"""

from __future__ import annotations

import itertools
import weakref

import torch
import torch.fx
from torch import Tensor

UNCAPTURABLE = (torch.Tag.cudagraph_unsafe,)
"""A CUDA graph replays kernels without running Python, so the ops' records would silently stop:
the tag asks torch.compile's CUDA graphs (``mode="reduce-overhead"``) not to capture them (not yet
checked on a GPU)."""

_captures: dict[int, weakref.ref] = {}
_numbers = itertools.count()


def register(capture) -> int:
    """A number that finds ``capture`` from inside a compiled graph while it lives."""
    number = next(_numbers)
    _captures[number] = weakref.ref(capture)
    weakref.finalize(capture, _captures.pop, number, None)
    return number


def _found(number: int):
    ref = _captures.get(number)
    return None if ref is None else ref()


@torch.library.custom_op("opcomp::layer_output", mutates_args=(), tags=UNCAPTURABLE)
def layer_output(output: Tensor, layer_input: Tensor, capture: int, slot: int, layer: int) -> tuple[Tensor, Tensor]:
    """The layer's output, copied, and a ticket (-1: nothing recorded) that its backward brings
    back to :func:`layer_grad`; records the input when the capture is armed."""
    found = _found(capture)
    ticket = -1 if found is None else found.record_input(slot, layer, layer_input)
    return output.clone(), torch.tensor(ticket, dtype=torch.int64)


@layer_output.register_fake
def _(output: Tensor, layer_input: Tensor, capture: int, slot: int, layer: int) -> tuple[Tensor, Tensor]:
    return torch.empty_like(output), torch.empty((), dtype=torch.int64)


@torch.library.custom_op("opcomp::layer_grad", mutates_args=(), tags=UNCAPTURABLE)
def layer_grad(grad: Tensor, ticket: Tensor, capture: int) -> None:
    """Records the gradient that reached the output :func:`layer_output` gave ``ticket``."""
    found = _found(capture)
    number = int(ticket)  # a CPU tensor: no device sync
    if found is not None and number >= 0:
        found.record_grad(number, grad)


@layer_grad.register_fake
def _(grad: Tensor, ticket: Tensor, capture: int) -> None:
    return None


@torch.library.custom_op("opcomp::model_forward", mutates_args=(), tags=UNCAPTURABLE)
def model_forward(capture: int, model: int, starts: bool) -> None:
    """A forward of the model starts (or ends)."""
    found = _found(capture)
    if found is not None:
        found.model_forward(model, starts)


@model_forward.register_fake
def _(capture: int, model: int, starts: bool) -> None:
    return None


def _keep(ctx, inputs: tuple, output: tuple) -> None:
    ctx.capture = inputs[2]
    ctx.save_for_backward(output[1])


def _backward(ctx, grad: Tensor, _ticket: Tensor | None):
    (ticket,) = ctx.saved_tensors
    torch.ops.opcomp.layer_grad(grad, ticket, ctx.capture)
    return grad, None, None, None, None


layer_output.register_autograd(_backward, setup_context=_keep)
# Ops that return nothing are kept only when the graph knows they act: they record.
torch.fx.node.has_side_effect(torch.ops.opcomp.layer_grad.default)
torch.fx.node.has_side_effect(torch.ops.opcomp.model_forward.default)
