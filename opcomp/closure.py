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

import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from opcomp.autograd import differentiate
from opcomp.distributed import DataParallel, is_shard
from opcomp.errors import OpcompError
from opcomp.finite import NonFinite, require
from opcomp.precision import working, working_dtype
from opcomp.prediction import Prediction
from opcomp.quiet import quiet

CLOSURE_SHAPE = "def closure(): return loss_fn(model(x), y)"


def check_loss(loss, *, probing: bool) -> Tensor:
    """The closure's return value, checked: a scalar loss tensor, with a graph to the parameters
    when opcomp differentiates it (``probing``)."""
    if not isinstance(loss, Tensor):
        got = "None" if loss is None else type(loss).__name__
        raise OpcompError(f"the closure returned {got}; it must return the loss tensor: {CLOSURE_SHAPE}")
    if loss.numel() != 1:
        raise OpcompError(
            f"the closure returned a tensor of shape {tuple(loss.shape)}; the loss must be a scalar "
            "(reduce it with .mean() or .sum())"
        )
    if probing and not loss.requires_grad:
        raise OpcompError(
            "the closure's loss does not depend on the parameters (computed under torch.no_grad() or "
            "detached); return the loss as the model computed it"
        )
    return loss


class GradMarks:
    """Which tensor each parameter's ``.grad`` was, and its version, before a closure ran: the
    closure ran backward when one changed (a new tensor, or the same one added to in place)."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = params
        self.marks = [(p.grad, None if p.grad is None else p.grad._version) for p in params]

    def backward_ran(self) -> bool:
        return any(p.grad is not g or (g is not None and g._version != v) for p, (g, v) in zip(self.params, self.marks))

    def added_to(self) -> list[int]:
        """Parameters whose gradient from before the call was added to in place (accumulation)."""
        return [i for i, (p, (g, _)) in enumerate(zip(self.params, self.marks)) if g is not None and p.grad is g]


@contextmanager
def own_grads(params: Sequence[Tensor]) -> Iterator[None]:
    """``.grad`` of ``params`` as it was before, whatever a closure's backward does inside."""
    saved = [p.grad for p in params]
    try:
        yield
    finally:
        for param, grad in zip(params, saved):
            param.grad = grad


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
    calls: list[ModelCallRecord] = field(default_factory=list)  # the model's forwards in the first evaluation
    evaluations: int = 1  # forward passes through the closure this step
    probed: list[float] = field(default_factory=list)  # losses at shifted points
    prediction: Prediction = field(default_factory=Prediction)  # where the prediction is in the model's output
    calls_backward: bool | None = None  # the closure runs backward itself (None: not seen yet)
    params: Sequence[Tensor] = ()  # every parameter of the optimizer, whose .grad a closure may write
    parallel: DataParallel | None = None  # the ranks over which probed losses and gradients are averaged
    _loss_gradients: list[Tensor] | None = None

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
            with self.disarm(), quiet(self.model, self.closure) if restore else nullcontext():
                yield
        finally:
            with torch.no_grad():
                for param, value in zip(params, saved):
                    param.data.copy_(value)
                for buffer, value in buffers:
                    buffer.data.copy_(value)

    def evaluate(self, *, grad: bool) -> Tensor:
        """The closure's loss at the current point (with its graph when ``grad``); NonFinite if inf
        or NaN (across ranks that is decided after their values are pooled, so all decide alike).
        Without ``grad``, a closure that calls backward runs with gradients on and leaves ``.grad``
        as it was."""
        self.evaluations += 1
        if grad:
            with torch.enable_grad():
                loss = check_loss(self.closure(), probing=not self.calls_backward)
        else:
            with own_grads(self.params) if self.calls_backward is not False else nullcontext():
                if self.calls_backward is None:
                    loss = self._first_without_gradients()
                else:
                    with torch.set_grad_enabled(self.calls_backward):
                        loss = check_loss(self.closure(), probing=False)
        if self.parallel is None and not bool(torch.isfinite(loss.detach())):
            raise NonFinite
        return loss

    def _first_without_gradients(self) -> Tensor:
        """The first loss-only evaluation of a closure not seen yet: under no_grad, or, when its own
        backward refuses that, again with gradients (running statistics as after one pass)."""
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()] if self.model is not None else []
        marks = GradMarks(self.params)
        try:
            with torch.no_grad():
                loss = check_loss(self.closure(), probing=False)
            self.calls_backward = marks.backward_ran()
            return loss
        except RuntimeError as error:
            if "does not require grad" not in str(error):
                raise
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)
        self.calls_backward = True
        with torch.enable_grad():
            return check_loss(self.closure(), probing=False)

    def centre(self) -> Tensor:
        """The loss at p: the first evaluation's, or one forward pass (no graph) when there was none."""
        if self.loss is None:
            self.trained = True
            self.loss = self.evaluate(grad=False)
        if self.parallel is None:
            return self.loss.detach()
        return self.loss.detach().new_tensor(self.pooled(float(self.loss)))

    def loss_at(self, params: Sequence[Tensor], directions: Iterable[Tensor], scale: float) -> float:
        """L(p + scale·d), without a graph."""
        with self.shifted(params, directions, scale):
            value = self.pooled(float(self.evaluate(grad=False)))
        self.probed.append(value)
        return value

    def pooled(self, loss: float) -> float:
        """A probed loss over every rank's batch; NonFinite (on every rank alike) if inf or NaN."""
        value = loss if self.parallel is None else self.parallel.mean_value(loss)
        if not math.isfinite(value):
            raise NonFinite
        return value

    def reduced(self, grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> list[Tensor | None]:
        """Gradients or curvature products of opcomp's own backward, averaged over the ranks as DDP
        averages gradients (unchanged in one process)."""
        return averaged(grads, params, self.parallel)

    def estimate(self) -> Tensor:
        """What the step reports as its loss without a training pass: the mean of the probed losses,
        which for symmetric probes p ± Δ is L(p) + O(Δ²)."""
        if self.loss is not None:
            return self.loss.detach()
        return torch.tensor(sum(self.probed) / len(self.probed)) if self.probed else torch.tensor(float("nan"))

    def gradient_at(self, params: Sequence[Tensor], directions: Iterable[Tensor], scale: float) -> list[Tensor]:
        """∇L(p + scale·d) for ``params`` (zeros where the loss does not reach one): opcomp's own
        backward, or what a closure that calls backward leaves in ``.grad``."""
        with self.shifted(params, directions, scale):
            if self.calls_backward:
                with own_grads(self.params):
                    for param in self.params:
                        param.grad = None
                    self.evaluate(grad=True)
                    grads = [p.grad for p in params]
            else:
                loss = self.evaluate(grad=True)
                grads = differentiate(loss, list(params), allow_unused=True, needed_by="a probe's gradient")
                grads = self.reduced([None if g is None else g.detach() for g in grads], params)
                if self.parallel is not None:
                    self.pooled(float(loss))
        return require([zeros_like_working(p) if g is None else working(g.detach()) for p, g in zip(params, grads)])

    def check_model_call(self) -> None:
        """Gauss–Newton products differentiate at the model's outputs: the closure must have called it."""
        if not self.calls:
            raise OpcompError(
                "Gauss–Newton products need the model's output: the closure must call the model given to opcomp.build"
            )

    def loss_gradients(self) -> list[Tensor]:
        """∂L/∂f_i at each recorded model output f_i, with its graph (for products with the loss
        Hessian; several outputs when the closure accumulates micro-batches)."""
        self.check_model_call()
        if self._loss_gradients is None:
            outputs = [call.output for call in self.calls]
            self._loss_gradients = list(
                differentiate(
                    self.loss, outputs, create_graph=True, retain_graph=True, needed_by="a Gauss–Newton product"
                )
            )
        return self._loss_gradients


def averaged(grads: Sequence[Tensor | None], params: Sequence[Tensor], parallel: DataParallel | None) -> list:
    """Gradients (or products) of opcomp's own backward, averaged over the ranks as DDP averages
    gradients; unchanged in one process."""
    return list(grads) if parallel is None else parallel.mean_gradients(grads, params)


def zeros_like_working(param: Tensor) -> Tensor:
    """Zeros for a parameter the loss does not reach, in its working precision."""
    return torch.zeros_like(param, dtype=working_dtype(param.dtype))


def first_evaluation(
    closure,
    params: list[Tensor],
    graphs,
    model: nn.Module | None,
    disarm,
    probing: bool,
    prediction: Prediction,
    parallel: DataParallel | None = None,
) -> tuple[Tensor | None, Probe | None]:
    """The closure's first call, at the current parameters, and opcomp's own backward pass.

    Returns the detached loss and, when the expressions probe, the :class:`Probe` that carries what
    the probes need from this call. Expressions that estimate from loss values alone get no call
    here: their probes evaluate the closure themselves. A closure that runs backward itself keeps
    torch's semantics (``.grad`` as it leaves it, accumulation included); first-order probes then
    read ``.grad`` after each of their calls, and second-order ones refuse it. The gradients of
    opcomp's own backward are averaged over ``parallel``'s ranks; a closure's backward is the
    wrapper's (DDP averages it).
    """
    nodes = [n for graph in graphs for n in graph.nodes]
    double = any(n.spec.needs.double_backward for n in nodes)
    # Gauss–Newton probes (gnvp, lgn) differentiate the loss at the model's recorded output
    outputs = any(n.spec.needs.closure and n.spec.needs.model for n in nodes)
    twice = any(n.spec.differentiates_twice for n in nodes)  # the training pass's graph, again
    if probing and not any(graph.trains for graph in graphs):
        return None, Probe(closure, model, disarm, None, evaluations=0, params=params, parallel=parallel)
    recorder = ModelCall(model if outputs else None, prediction)
    marks = GradMarks(params)
    with torch.enable_grad(), recorder, second_derivatives(twice):
        loss = closure()
    if marks.backward_ran():
        check_loss(loss, probing=False)
        if probing:
            refuse_own_backward(nodes, marks)
            probe = Probe(closure, model, disarm, loss.detach(), calls_backward=True, params=params, parallel=parallel)
            return loss.detach(), probe
        return loss.detach(), None
    loss = check_loss(loss, probing=probing)
    for param in params:
        param.grad = None
    if not probing and loss.requires_grad and any(is_shard(p) for p in params):
        # FSDP2 reduce-scatters gradients in hooks that only a real backward fires (autograd.grad
        # would leave each rank its own); probes, which need autograd.grad, are refused at build
        with torch.enable_grad():  # a checkpointed model recomputes its forward in the backward
            loss.backward()
        return loss.detach(), None
    graph_grads = {}
    if loss.requires_grad and any(n.spec.reads_gradient for n in nodes):
        graph_grads = own_backward(loss, params, double, twice, probing, parallel)
    if not probing:
        return loss.detach(), None
    calls = recorder.calls
    return loss.detach(), Probe(
        closure, model, disarm, loss, graph_grads, calls, prediction=prediction, params=params, parallel=parallel
    )


def own_backward(
    loss: Tensor, params: list[Tensor], double: bool, twice: bool, probing: bool, parallel: DataParallel | None
) -> dict[int, Tensor]:
    """opcomp's backward of the first evaluation: each trainable parameter's ``.grad`` set to the
    gradient averaged over the ranks; returns, when ``double`` (Hessian products follow), this
    rank's gradients with their graph by parameter id (products are averaged after)."""
    trainable = [p for p in params if p.requires_grad]
    with torch.enable_grad(), second_derivatives(twice):
        grads = differentiate(
            loss,
            trainable,
            create_graph=double,
            retain_graph=probing,
            allow_unused=True,
            needed_by="opt.step(closure)'s backward",
        )
    means = averaged([None if g is None else g.detach() for g in grads], trainable, parallel)
    graph_grads = {}
    for param, grad, mean in zip(trainable, grads, means):
        param.grad = mean
        if double and grad is not None:
            graph_grads[id(param)] = grad
    return graph_grads


def second_derivatives(needed: bool = True):
    """For passes that are differentiated again: attention through the math kernel, since fused
    ones have no second derivative, and torch.compile'd code run eagerly, since compiled graphs
    have no double backward. A checkpointed model recomputes its forward inside the backward, so
    the backward takes this context too."""
    if not needed:
        return nullcontext()
    stack = ExitStack()
    stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    if "torch._dynamo" in sys.modules:  # else nothing is compiled, and importing it costs a second
        stack.enter_context(torch.compiler.set_stance("force_eager"))
    return stack


def refuse_own_backward(nodes, marks: GradMarks) -> None:
    """A closure that ran backward gives gradients, nothing to differentiate again or replay, and
    with probes it must not add to gradients from before the step (its probes see one batch)."""
    second = [n.op for n in nodes if n.spec.differentiates_twice]
    if second:
        raise OpcompError(
            f"'{second[0]}' differentiates the loss again, which needs opcomp's own backward pass, but the "
            f"closure called backward() itself: return the loss instead ({CLOSURE_SHAPE}); in Lightning, "
            "set automatic_optimization = False and call opt.step(closure) in training_step (docs/integrations.md)"
        )
    if marks.added_to():
        raise OpcompError(
            "the closure's backward() added to gradients from before the step (gradient accumulation), but the "
            "probes evaluate the closure again and see only its batch: accumulate inside the closure (loop over "
            "the micro-batches and return their mean loss), or zero the gradients with set_to_none=True first"
        )


@dataclass
class ModelCallRecord:
    """One forward of the model: what it received, and its prediction inside the loss graph."""

    args: tuple
    kwargs: dict
    output: Tensor


class ModelCall:
    """Records every forward of the model while active (Gauss–Newton products replay them)."""

    def __init__(self, model: nn.Module | None, prediction: Prediction) -> None:
        self.model = model
        self.prediction = prediction
        self.handle = None
        self.calls: list[ModelCallRecord] = []

    def __enter__(self):
        if self.model is not None:
            self.handle = self.model.register_forward_hook(self._keep, with_kwargs=True)
        return self

    def _keep(self, module, args, kwargs, returned) -> None:
        self.calls.append(ModelCallRecord(args, kwargs, self.prediction(returned)))

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()
