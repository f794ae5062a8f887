"""Module hooks that record what layer statistics need: inputs and output gradients.

A forward hook on each supported layer keeps a reference to the layer's input and puts a tensor
hook on its output, which receives the gradient of the loss with respect to that output during
backward. Nothing is recorded unless the capture is armed (the optimizer arms it for steps where
statistics are due) and gradients are enabled, outside torch.func transforms, so evaluation and
functional probes cost nothing and leave the statistics alone.

With a likelihood, the capture can also sample labels from the model's own prediction when the
model's forward ends and backpropagate them to the recorded layer outputs (one extra backward,
``autograd.grad(..., retain_graph=True)``), which gives the output gradients of the Monte Carlo
Fisher; the user's backward then runs on the retained graph as usual.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from opcomp.errors import OpcompError

Likelihood = Literal["categorical", "gaussian"]


@dataclass
class Entry:
    """One forward pass through one layer: its input, the output, and gradients that reached it."""

    input: Tensor
    output: Tensor | None = None
    grad: Tensor | None = None  # of the loss the user backpropagated
    sampled: Tensor | None = None  # of the sampled-label loss (Monte Carlo Fisher)


@dataclass
class Capture:
    """Hooks on ``modules`` of ``model``; :meth:`take` hands over and clears what was recorded."""

    model: nn.Module
    modules: list[nn.Module]
    likelihood: Likelihood | None = None
    armed: bool = True
    sample: bool = False  # also record Monte Carlo Fisher gradients
    entries: dict[nn.Module, list[Entry]] = field(default_factory=dict)
    handles: list = field(default_factory=list)

    def __post_init__(self) -> None:
        for module in self.modules:
            self.entries[module] = []
            self.handles.append(module.register_forward_hook(self._forward))
        if self.likelihood is not None:
            self.handles.append(self.model.register_forward_hook(self._sample_labels))

    def _recording(self) -> bool:
        return self.armed and torch.is_grad_enabled() and not _inside_functorch()

    def _forward(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if not self._recording() or not isinstance(output, Tensor) or not output.requires_grad:
            return
        entry = Entry(args[0].detach(), output if self.sample else None)
        self.entries[module].append(entry)

        def keep(grad: Tensor) -> None:
            entry.grad = grad.detach()

        output.register_hook(keep)

    def _sample_labels(self, model: nn.Module, args: tuple, output) -> None:
        if not (self._recording() and self.sample):
            return
        if not isinstance(output, Tensor):
            raise OpcompError(
                f"fisher=mc samples labels from the model's output, but the model returned a "
                f"{type(output).__name__}; wrap it so that it returns the prediction tensor"
            )
        pending = [e for entries in self.entries.values() for e in entries if e.output is not None]
        if not pending:
            return
        with torch.no_grad():
            gradient = sampled_gradient(output.detach(), self.likelihood)
        grads = torch.autograd.grad(output, [e.output for e in pending], gradient, retain_graph=True, allow_unused=True)
        for entry, grad in zip(pending, grads):
            entry.sampled = None if grad is None else grad.detach()
            entry.output = None

    def take(self, module: nn.Module) -> list[Entry]:
        """The finished entries of ``module`` (those a backward reached); the record is cleared."""
        entries = [e for e in self.entries[module] if e.grad is not None]
        self.entries[module] = []
        return entries

    def clear(self) -> None:
        for module in self.entries:
            self.entries[module] = []

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _inside_functorch() -> bool:
    """Passes under torch.func transforms (vmap, jacrev, …) are someone's probe, not training data."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


def sampled_gradient(prediction: Tensor, likelihood: Likelihood) -> Tensor:
    """∂ℓ/∂prediction per example, for a label drawn from the model's own predictive distribution.

    categorical: ℓ = cross-entropy of logits, gradient softmax(f) − onehot(y), y ~ softmax(f);
    gaussian: ℓ = ½‖f − y‖², gradient f − y = −ε, y = f + ε, ε ~ N(0, I).
    """
    if likelihood == "categorical":
        probabilities = torch.softmax(prediction.float(), dim=-1)
        labels = torch.multinomial(probabilities.reshape(-1, probabilities.shape[-1]), 1).reshape(
            probabilities.shape[:-1]
        )
        onehot = nn.functional.one_hot(labels, probabilities.shape[-1]).to(probabilities.dtype)
        return (probabilities - onehot).to(prediction.dtype)
    return -torch.randn_like(prediction)
