"""Module hooks that record what layer statistics need: inputs and output gradients.

A forward hook on each supported layer keeps a reference to the layer's input and puts a tensor
hook on its output, which receives the gradient of the loss with respect to that output during
backward. Nothing is recorded unless the capture is armed (the optimizer arms it for steps where
statistics are due) and gradients are enabled, outside torch.func transforms, so evaluation and
functional probes cost nothing and leave the statistics alone. Each record notes which forward of
the model it came from, so micro-batches of an accumulated step are told apart.

A layer whose statistics read only what sums its positions (a Conv2d under KFAC) is summed as its
gradient arrives (``Capture.summed``, a function per layer given by the optimizer): the record
keeps those small matrices, and the input and the gradient go as they would without opcomp.

With a likelihood, the capture can also sample labels from the model's own prediction when the
model's forward ends and backpropagate them to the recorded layer outputs (one extra backward,
``autograd.grad(..., retain_graph=True)``), which gives the output gradients of the Monte Carlo
Fisher; the user's backward then runs on the retained graph as usual.

Under torch.compile the hooks call :mod:`opcomp.capture_ops` instead, which the compiled graph
keeps whole; the Monte Carlo Fisher's extra backward cannot run inside a compiled graph, so a
capture with a likelihood keeps its eager hooks, which break the graph at each hooked layer (said
once, when torch.compile first traces them).

The hooks hold the capture weakly and go when it does: an optimizer that is dropped (or closed)
leaves nothing behind on the model.
"""

from __future__ import annotations

import itertools
import sys
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

import opcomp.capture_ops as capture_ops
from opcomp.autograd import differentiate
from opcomp.errors import OpcompError, OpcompNotice, warn
from opcomp.prediction import Prediction

Likelihood = Literal["categorical", "gaussian"]
Summing = Callable[[Tensor, Tensor], Any]
"""(input, output gradient) -> what a layer's statistics read of them, formed as the gradient
arrives so that neither is held until the step (:mod:`opcomp.layers.summed`)."""

LAYOUT_TOLERANCE = 1e-2
"""A cross-entropy's output gradient sums to zero over the class dimension; relative to its largest
entry, rounding leaves far less than this even over 50,000 bf16 classes."""


@dataclass
class Entry:
    """One forward pass through one layer: its input, the output, and gradients that reached it."""

    input: Tensor | None  # None once summed
    forward: int  # which forward of the model (micro-batch) it belongs to
    output: Tensor | None = None
    grad: Tensor | None = None  # of the loss the user backpropagated; None once summed
    sampled: Tensor | None = None  # of the sampled-label loss (Monte Carlo Fisher)
    summing: Summing | None = None  # what is kept of the input and the gradient (Capture.summed)
    summed: Any = None  # what it kept; the input and the gradient are let go

    def receive(self, grad: Tensor) -> None:
        """The gradient reached the layer's output: kept, or summed at once with the input."""
        if self.summing is None:
            self.grad = grad
            return
        self.summed = self.summing(self.input, grad)
        self.input = None

    @property
    def finished(self) -> bool:
        """A backward reached it."""
        return self.grad is not None or self.summed is not None


@dataclass(eq=False)
class Capture:
    """Hooks on ``modules`` of ``model``; :meth:`take` hands over and clears what was recorded.

    ``class_dim`` is the dimension of the model's output the likelihood is over (classes, or a
    Gaussian's features); ``reduction`` how the loss combines the positions of that output.
    """

    model: nn.Module
    modules: list[nn.Module]
    likelihood: Likelihood | None = None
    class_dim: int = 1
    reduction: Literal["mean", "sum"] = "mean"
    prediction: Prediction = field(default_factory=Prediction)  # where the prediction is in the model's output
    armed: bool = True
    sample: bool = False  # also record Monte Carlo Fisher gradients
    summed: dict[nn.Module, Summing] = field(default_factory=dict)  # layers whose record is summed at the gradient
    entries: dict[nn.Module, list[Entry]] = field(default_factory=dict)
    handles: list = field(default_factory=list)
    layer_handles: dict[nn.Module, object] = field(default_factory=dict)
    layout_error: str | None = None  # a sampling dimension the loss contradicts, found during backward
    _layout_checked: bool = False
    _forward_id: int | None = None  # the model forward running now
    _forwards: itertools.count = field(default_factory=itertools.count)
    _slots: dict[int, nn.Module] = field(default_factory=dict)  # what compiled graphs call the layers
    _pending: dict[int, Entry] = field(default_factory=dict)  # compiled records awaiting their gradient
    _tickets: itertools.count = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        this = weakref.ref(self)
        self.number = capture_ops.register(self)
        for module in self.modules:
            self._hook(module)
        traceable = self.likelihood is None
        self.handles.append(self.model.register_forward_pre_hook(model_hook(this, self.number, True, traceable)))
        self.handles.append(self.model.register_forward_hook(model_hook(this, self.number, False, traceable)))
        weakref.finalize(self, remove_hooks, self.handles)  # the list itself: hooks added later go too
        forget_compiled_code()

    def _hook(self, module: nn.Module) -> None:
        self.entries[module] = []
        slot = len(self._slots)
        self._slots[slot] = module
        hook = layer_hook(weakref.ref(self), self.number, slot, self.likelihood is None)
        self.layer_handles[module] = module.register_forward_hook(hook)
        self.handles.append(self.layer_handles[module])

    def retarget(self, modules: list[nn.Module], records: dict[nn.Module, tuple[Tensor, Tensor]]) -> None:
        """Capture ``modules`` from now on (the plan changed during the model's first forward, when
        its output head was settled): a layer new here takes its (input, output) of that forward,
        which is still running, as its hook would have."""
        for module in [m for m in self.modules if m not in modules]:
            handle = self.layer_handles.pop(module)
            handle.remove()
            self.handles.remove(handle)
            del self.entries[module]
        for module in [m for m in modules if m not in self.entries]:
            self._hook(module)
            if module in records:
                layer_input, output = records[module]
                self._forward(module, (layer_input,), output)
        self.modules = list(modules)

    def _recording(self) -> bool:
        return self.armed and torch.is_grad_enabled() and not _inside_functorch()

    def _model_starts(self, model: nn.Module, args: tuple) -> None:
        if model is self.model:  # not a copy of it (copy.deepcopy copies hooks too)
            self._forward_id = next(self._forwards)

    # -- what compiled graphs record, through opcomp.capture_ops -----------------------------------

    def model_forward(self, model: int, starts: bool) -> None:
        if model == id(self.model):
            self._forward_id = next(self._forwards) if starts else None

    def record_input(self, slot: int, layer: int, layer_input: Tensor) -> int:
        """Keeps a copy of a layer's input when armed; the ticket its gradient comes back with."""
        module = self._slots.get(slot)
        if not self.armed or module is None or id(module) != layer or module not in self.entries:
            return -1
        forward = self._forward_id if self._forward_id is not None else next(self._forwards)
        entry = Entry(layer_input.detach().clone(), forward, summing=self._summing(module))
        self.entries[module].append(entry)
        ticket = next(self._tickets)
        self._pending[ticket] = entry
        return ticket

    def record_grad(self, ticket: int, grad: Tensor) -> None:
        entry = self._pending.pop(ticket, None)
        if entry is not None:
            entry.receive(grad.detach() if entry.summing is not None else grad.detach().clone())

    def _forward(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        entries = self.entries.get(module)  # None: a deep copy of a captured layer, which is not ours
        if entries is None or not self._recording() or not isinstance(output, Tensor) or not output.requires_grad:
            return
        forward = self._forward_id if self._forward_id is not None else next(self._forwards)
        entry = Entry(args[0].detach(), forward, output if self.sample else None, summing=self._summing(module))
        entries.append(entry)

        def keep(grad: Tensor) -> None:
            entry.receive(grad.detach())

        output.register_hook(keep)

    def _summing(self, module: nn.Module) -> Summing | None:
        """How the layer's record is summed as its gradient arrives, if it is: never while sampling
        labels (the sampled gradients come first, and are kept whole)."""
        return None if self.sample else self.summed.get(module)

    def _model_ends(self, model: nn.Module, args: tuple, output) -> None:
        if model is not self.model:
            return
        self._forward_id = None
        if not (self._recording() and self.sample):
            return
        output = self.prediction(output)
        pending = [e for entries in self.entries.values() for e in entries if e.output is not None]
        if not pending:
            return
        with torch.no_grad():
            gradient = sampled_gradient(output.detach(), self.likelihood, self.class_dim, self.reduction)
        grads = differentiate(
            output,
            [e.output for e in pending],
            gradient,
            retain_graph=True,
            allow_unused=True,
            needed_by="fisher=mc's sampled backward",
        )
        for entry, grad in zip(pending, grads):
            entry.sampled = None if grad is None else grad.detach()
            entry.output = None
        if self.likelihood == "categorical" and not self._layout_checked and output.requires_grad:
            output.register_hook(weakly(weakref.ref(self), Capture._check_layout))

    def _check_layout(self, grad: Tensor) -> None:
        """Once: does the user's loss treat ``class_dim`` as the classes? Recorded, raised at the step."""
        self._layout_checked = True
        dim = self.class_dim % grad.ndim
        zero_sum = classes_of(grad)
        if dim not in zero_sum and len(zero_sum) == 1:
            (other,) = zero_sum
            self.layout_error = (
                f"fisher=mc samples labels over dim {dim} of the model's output (shape {tuple(grad.shape)}), but "
                f"the loss's gradient sums to zero over dim {other}, the class dimension of a cross-entropy: "
                f"build with class_dim={other}"
            )

    def take(self, module: nn.Module) -> list[Entry]:
        """The finished entries of ``module`` (those a backward reached); the record is cleared."""
        if self.layout_error is not None:
            raise OpcompError(self.layout_error)
        recorded = self.entries[module]
        self.entries[module] = []
        gone = {id(e) for e in recorded}  # no gradient comes for them now
        self._pending = {t: e for t, e in self._pending.items() if id(e) not in gone}
        return [e for e in recorded if e.finished]

    def clear(self) -> None:
        for module in self.entries:
            self.entries[module] = []
        self._pending.clear()

    @contextmanager
    def disarmed(self):
        """Passes meanwhile (a probe's) feed no layer statistics."""
        armed, sample = self.armed, self.sample
        self.armed = self.sample = False
        try:
            yield
        finally:
            self.armed, self.sample = armed, sample

    def close(self) -> None:
        remove_hooks(self.handles)
        self.handles.clear()
        self.layer_handles.clear()
        self.clear()


def forget_compiled_code() -> bool:
    """Drop the code torch.compile has traced so far, and say so; True when there was some.

    Dynamo does not guard on a module's hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``),
    so code traced before the capture's hooks existed — the model compiled and run before
    ``opcomp.build``, or another instance of its class — would run on without them and the step
    would find no statistics. Dropped, the next compiled call traces the hooks in.
    """
    frames = sys.modules.get("torch._dynamo.convert_frame")  # not imported: nothing was compiled
    if frames is None:
        return False
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    traced = [code for ref in frames.input_codes.seen if (code := ref()) is not None]
    if not any(_debug_get_cache_entry_list(code) for code in traced):
        return False
    torch._dynamo.reset_code_caches()
    warn(
        "opcomp: torch.compile had traced code before opcomp.build added its hooks, and compiled code does "
        "not see hooks added later: its cache is cleared, so the next compiled call traces again (a one-time "
        "compile) with the hooks in place",
        OpcompNotice,
    )
    return True


def layer_hook(target: weakref.ref, number: int, slot: int, traceable: bool):
    """A layer's forward hook: the eager capture, or under torch.compile (``traceable``) the op
    that records from inside the compiled graph."""

    eager = weakly(target, Capture._forward)

    def hook(module: nn.Module, args: tuple, output):
        if torch.compiler.is_compiling():
            if not traceable:
                _breaks_compiled_graphs()
            elif torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad:
                recorded, _ = torch.ops.opcomp.layer_output(output, args[0], number, slot, id(module))
                return recorded
            else:
                return None
        return eager(module, args, output)

    return hook


def model_hook(target: weakref.ref, number: int, starts: bool, traceable: bool):
    """The model's forward pre-hook (``starts``) or forward hook, eager or compiled as :func:`layer_hook`.
    Two functions, not one with a flag: compiled, each keeps its own graph."""

    eager = weakly(target, Capture._model_starts if starts else Capture._model_ends)

    def pre_hook(model: nn.Module, args: tuple):
        if torch.compiler.is_compiling() and traceable:
            torch.ops.opcomp.model_forward(number, id(model), True)
            return None
        return eager(model, args)

    def hook(model: nn.Module, args: tuple, output):
        if torch.compiler.is_compiling() and traceable:
            torch.ops.opcomp.model_forward(number, id(model), False)
            return None
        return eager(model, args, output)

    return pre_hook if starts else hook


@torch.compiler.disable
def _breaks_compiled_graphs() -> None:
    """Once: a capture that samples labels (fisher=mc) runs eagerly between compiled graphs."""
    warn(
        "opcomp: fisher=mc samples labels with an extra backward from the model's output to each captured "
        "layer's output, which cannot run inside a compiled graph: torch.compile breaks its graph at every "
        "captured layer (`python -m opcomp.bench.graph_breaks` counts them); fisher=empirical traces whole",
        OpcompNotice,
    )


def weakly(target: weakref.ref, method, compiled: bool = True):
    """A hook that calls ``method`` on ``target`` while it lives, and does nothing after. With
    ``compiled=False`` it also does nothing inside a graph torch.compile traces."""

    def hook(*args):
        if not compiled and torch.compiler.is_compiling():
            return None
        live = target()
        return None if live is None else method(live, *args)

    return hook


def remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()


def _inside_functorch() -> bool:
    """Passes under torch.func transforms (vmap, jacrev, …) are someone's probe, not training data."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


def classes_of(grad: Tensor) -> list[int]:
    """The dimensions (not the batch's) over which ``grad`` sums to zero at every other index."""
    values = grad.detach().float()
    largest = float(values.abs().max()) if values.numel() else 0.0
    if largest == 0.0:
        return []
    return [
        dim
        for dim in range(1, values.ndim)
        if values.shape[dim] > 1 and float(values.sum(dim).abs().max()) <= LAYOUT_TOLERANCE * largest
    ]


def sampled_gradient(prediction: Tensor, likelihood: Likelihood, class_dim: int, reduction: str) -> Tensor:
    """∂ℓ_n/∂prediction per example, for labels drawn from the model's own predictive distribution.

    categorical: ℓ = cross-entropy of the logits along ``class_dim``, gradient softmax(f) − onehot(y),
    y ~ softmax(f) at every other position; gaussian: ℓ = ½‖f − y‖² over ``class_dim``, gradient
    f − y = −ε, y = f + ε, ε ~ N(0, I). Every other dimension after the first is a position (a token,
    a pixel); with ``reduction="mean"`` the loss averages its positions, so each gets 1/positions.
    """
    if prediction.ndim < 2:
        if likelihood == "categorical":
            raise OpcompError(
                f"fisher=mc with a categorical likelihood needs logits of shape (N, C, …); the model returned "
                f"shape {tuple(prediction.shape)}"
            )
        return -torch.randn_like(prediction)  # one value per example
    dim = class_dim % prediction.ndim
    if dim == 0:
        raise OpcompError("class_dim cannot be the batch dimension 0 of the model's output")
    if likelihood == "categorical":
        probabilities = torch.softmax(prediction.float(), dim=dim).movedim(dim, -1)
        classes = probabilities.shape[-1]
        labels = torch.multinomial(probabilities.reshape(-1, classes), 1).reshape(probabilities.shape[:-1])
        onehot = nn.functional.one_hot(labels, classes).to(probabilities.dtype)
        gradient = (probabilities - onehot).movedim(-1, dim)
    else:
        gradient = -torch.randn_like(prediction, dtype=torch.float32)
    positions = prediction.numel() // (prediction.shape[0] * prediction.shape[dim]) if prediction.numel() else 1
    if reduction == "mean" and positions > 1:
        gradient = gradient / positions
    return gradient.to(prediction.dtype)
