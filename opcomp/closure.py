"""The closure protocol: opcomp evaluates the loss, runs the backward passes, and probes around p.

One training loop fits every expression::

    def closure():
        return loss_fn(model(x), y)      # the loss; no zero_grad, no backward

    loss = opt.step(closure)

opcomp calls the closure once at the current parameters (that pass is the training pass: it
updates BatchNorm statistics and feeds layer statistics), differentiates it itself, and calls it
again only to probe shifted points (SAM, ``grad_at``, zeroth-order estimates). A probe shifts the
parameters, evaluates with the layer-statistics capture disarmed, then restores every parameter
by copying it back (bit for bit) and every buffer of the model (running statistics) likewise.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from opcomp.errors import OpcompError
from opcomp.precision import working, working_dtype

CLOSURE_SHAPE = "def closure(): return loss_fn(model(x), y)"


class NonFinite(Exception):
    """A probe met inf or NaN: the step is abandoned and nothing it changed is kept."""


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element is finite, exactly, at the cost of one sum per tensor and one sync
    per device and dtype.

    A finite sum proves its elements finite (an infinity never cancels to a finite value); a
    non-finite sum is an inf or NaN element, or finite values that overflow, which the exact
    element-wise check tells apart.
    """
    groups: dict[tuple, list[Tensor]] = defaultdict(list)
    for tensor in tensors:
        groups[(tensor.device, tensor.dtype)].append(tensor)
    for same in groups.values():
        if not bool(torch.stack([t.sum() for t in same]).isfinite().all()):
            if not all(bool(torch.isfinite(t).all()) for t in same):
                return False
    return True


def finite(values: Sequence[Tensor]) -> list[Tensor]:
    """``values``, or NonFinite when any holds inf or NaN."""
    if not all_finite(values):
        raise NonFinite
    return list(values)


def check_loss(loss, *, probing: bool, params: Sequence[Tensor]) -> Tensor:
    """The closure's return value, checked: a scalar loss tensor with a graph to the parameters."""
    if not isinstance(loss, Tensor):
        got = "None" if loss is None else type(loss).__name__
        raise OpcompError(f"the closure returned {got}; it must return the loss tensor: {CLOSURE_SHAPE}")
    if loss.numel() != 1:
        raise OpcompError(
            f"the closure returned a tensor of shape {tuple(loss.shape)}; the loss must be a scalar "
            "(reduce it with .mean() or .sum())"
        )
    if probing and any(p.grad is not None for p in params):
        raise OpcompError(
            "the closure called backward(); with probe operators opcomp runs every backward pass itself, "
            f"so the closure only returns the loss: {CLOSURE_SHAPE}"
        )
    if not loss.requires_grad and not probing:
        return loss
    if not loss.requires_grad:
        raise OpcompError(
            "the closure's loss does not depend on the parameters (computed under torch.no_grad() or "
            "detached); return the loss as the model computed it"
        )
    return loss


@dataclass
class Probe:
    """One step's closure and what its first evaluation left behind.

    An expression that estimates from loss values alone (``zo``) has no first evaluation: ``loss``
    is None, the first probe's forward pass plays the training pass (its updates of running
    statistics stay), and the loss at p is evaluated only if a kernel asks for it (:meth:`centre`).
    """

    closure: Callable[[], Tensor]
    model: nn.Module | None
    disarm: Callable[[], Iterator[None]]  # context manager that silences statistics capture
    loss: Tensor | None
    graph_grads: dict[int, Tensor] = field(default_factory=dict)  # id(param) -> ∇L with its graph
    inputs: tuple = ()  # what the model's forward received in the first evaluation
    input_kwargs: dict = field(default_factory=dict)
    output: Tensor | None = None  # and what it returned, inside the loss graph
    evaluations: int = 1  # forward passes through the closure this step
    probed: list[float] = field(default_factory=list)  # losses at shifted points
    _loss_gradient: Tensor | None = None

    def __post_init__(self) -> None:
        self.trained = self.loss is not None  # whether this step's training pass has run

    @contextmanager
    def shifted(self, params: Sequence[Tensor], directions: Iterable[Tensor], scale: float):
        """Parameters moved to p + scale·d for the duration; restored exactly afterwards.

        ``directions`` may be drawn lazily, one per parameter, so noise need not be kept. The
        moves go through ``.data``, which leaves autograd's version counters alone: the first
        evaluation's graph (kept for Hessian products) saved these very tensors, and since they are
        restored bit for bit before that graph is used again, an ``hvp`` may follow a ``sam`` or
        ``zo`` probe in one step.
        """
        saved = [param.detach().clone() for param in params]
        keep_buffers = not self.trained  # no training pass this step: this forward is it
        self.trained = True
        restore = self.model is not None and not keep_buffers
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()] if restore else []
        try:
            with torch.no_grad():
                for param, direction in zip(params, directions):
                    param.data.add_(direction.to(param.dtype), alpha=scale)
            with self.disarm():
                yield
        finally:
            with torch.no_grad():
                for param, value in zip(params, saved):
                    param.data.copy_(value)
                for buffer, value in buffers:
                    buffer.data.copy_(value)

    def evaluate(self, *, grad: bool) -> Tensor:
        """The closure's loss at the current point (with its graph when ``grad``); NonFinite if inf or NaN."""
        self.evaluations += 1
        with torch.set_grad_enabled(grad):
            loss = check_loss(self.closure(), probing=False, params=())
        if not bool(torch.isfinite(loss.detach())):
            raise NonFinite
        return loss

    def centre(self) -> Tensor:
        """The loss at p: the first evaluation's, or one forward pass (no graph) when there was none."""
        if self.loss is None:
            self.trained = True
            self.loss = self.evaluate(grad=False)
        return self.loss.detach()

    def loss_at(self, params: Sequence[Tensor], directions: Iterable[Tensor], scale: float) -> float:
        """L(p + scale·d), without a graph."""
        with self.shifted(params, directions, scale):
            value = float(self.evaluate(grad=False))
        self.probed.append(value)
        return value

    def estimate(self) -> Tensor:
        """What the step reports as its loss without a training pass: the mean of the probed losses,
        which for symmetric probes p ± Δ is L(p) + O(Δ²)."""
        if self.loss is not None:
            return self.loss.detach()
        return torch.tensor(sum(self.probed) / len(self.probed)) if self.probed else torch.tensor(float("nan"))

    def gradient_at(self, params: Sequence[Tensor], directions: Iterable[Tensor], scale: float) -> list[Tensor]:
        """∇L(p + scale·d) for ``params`` (zeros where the loss does not reach one)."""
        with self.shifted(params, directions, scale):
            loss = self.evaluate(grad=True)
            grads = torch.autograd.grad(loss, list(params), allow_unused=True)
        return finite([_zero_like(p) if g is None else working(g.detach()) for p, g in zip(params, grads)])

    def check_model_call(self) -> None:
        """Gauss–Newton products replay the model's forward: the closure must have called it."""
        if self.output is None:
            raise OpcompError(
                "Gauss–Newton products need the model's output: the closure must call the model given to "
                "opcomp.build, and the model must return the prediction tensor"
            )

    def loss_gradient(self) -> Tensor:
        """∂L/∂f at the model's output f, with its graph (for products with the loss Hessian)."""
        self.check_model_call()
        if self._loss_gradient is None:
            (self._loss_gradient,) = torch.autograd.grad(self.loss, self.output, create_graph=True, retain_graph=True)
        return self._loss_gradient


def _zero_like(param: Tensor) -> Tensor:
    """The gradient of a parameter the loss does not reach, in its working precision."""
    return torch.zeros_like(param, dtype=working_dtype(param.dtype))


def first_evaluation(
    closure, params: list[Tensor], graphs, model: nn.Module | None, disarm, probing: bool
) -> tuple[Tensor | None, Probe | None]:
    """The closure's first call, at the current parameters, and opcomp's own backward pass.

    Returns the detached loss and, when the expressions probe, the :class:`Probe` that carries what
    the probes need from this call. Expressions that estimate from loss values alone get no call
    here: their probes evaluate the closure themselves.
    """
    nodes = [n for graph in graphs for n in graph.nodes]
    double = any(n.spec.needs.double_backward for n in nodes)
    # Gauss–Newton probes (gnvp, lgn) differentiate the loss at the model's recorded output
    outputs = any(n.spec.needs.closure and n.spec.needs.model for n in nodes)
    for param in params:
        param.grad = None
    if probing and not any(graph.trains for graph in graphs):
        return None, Probe(closure, model, disarm, None, evaluations=0)
    recorder = ModelCall(model if outputs else None)
    # fused attention kernels have no second derivative: differentiate through the math one
    backend = sdpa_kernel([SDPBackend.MATH]) if double else nullcontext()
    with torch.enable_grad(), recorder, backend:
        loss = closure()
    loss = check_loss(loss, probing=probing, params=params)
    if not probing and any(p.grad is not None for p in params):
        return loss.detach(), None  # a torch-style closure ran its own backward
    graph_grads = {}
    if loss.requires_grad and any(n.spec.reads_gradient for n in nodes):
        trainable = [p for p in params if p.requires_grad]
        with torch.enable_grad():
            grads = torch.autograd.grad(loss, trainable, create_graph=double, retain_graph=probing, allow_unused=True)
        for param, grad in zip(trainable, grads):
            param.grad = None if grad is None else grad.detach()
            if double and grad is not None:
                graph_grads[id(param)] = grad
    if not probing:
        return loss.detach(), None
    return loss.detach(), Probe(closure, model, disarm, loss, graph_grads, *recorder.recorded())


class ModelCall:
    """Records what the model's forward received and returned, while active (for Gauss–Newton products)."""

    def __init__(self, model: nn.Module | None) -> None:
        self.model = model
        self.handle = None
        self.call: tuple = ((), {}, None)

    def __enter__(self):
        if self.model is not None:
            self.handle = self.model.register_forward_hook(self._keep, with_kwargs=True)
        return self

    def _keep(self, module, args, kwargs, output) -> None:
        self.call = (args, kwargs, output if isinstance(output, Tensor) else None)

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()

    def recorded(self) -> tuple:
        return self.call
