"""The compiled route: an element-wise family's step as one ``torch.compile``d function.

A family compiles with ``compile="on"``, or "auto" on CUDA; the learning rates are 0-d tensors
so schedules never recompile. It steps eagerly once first (it makes its state there, outside the
graph); from then on its graph holds the step's finiteness check too (:func:`guarded`), so a step
reads no value back from the device. A compiler that fails under "auto" leaves the optimizer
eager, with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from opcomp.errors import OpcompNotice
from opcomp.finite import flag
from opcomp.graph import Graph
from opcomp.kernels.context import BucketStep
from opcomp.plan import Program
from opcomp.precision import working_dtype
from opcomp.skips import Skips
from opcomp.step.eager import step_in_place
from opcomp.step.update import bucket_steps, changing


class Compiled:
    """The compiled steps of an optimizer's in-place families, one per family and participation."""

    def __init__(self, compile: str) -> None:  # noqa: A002 - the option's documented name
        self.compile = compile
        self.runners: dict[tuple, Callable] = {}
        self.started: set[tuple] = set()
        self.lr_tensors: dict[tuple, Tensor] = {}

    def compiles(self, items: list) -> bool:
        """Whether a family's in-place ``items`` step compiled; never when there are none. auto: on
        CUDA only. On the CPU a cold compile costs 5–40 s and pays back after 80–750 steps
        (``python -m opcomp.bench.compile_cost``), longer than many CPU runs: there it takes
        ``compile="on"``."""
        if not items or self.compile == "off":
            return False
        if self.compile == "auto" and not any(p.is_cuda for _, _, params in items for p in params):
            return False
        # a node that schedules its work on the host would recompile at every count
        return not any(s.node.spec.host_counted for _, bucket, _ in items for s in bucket.program.steps)

    def ready(self, expression: str, items: list) -> bool:
        """Whether the family's compiled step exists and made its state (it stepped once eagerly)."""
        return self.compiles(items) and key(expression, items) in self.started

    def stepped_eagerly(self, expression: str, items: list) -> None:
        """The family stepped eagerly: its compiled step may run from the next step on."""
        if self.compiles(items):
            self.started.add(key(expression, items))

    def run(
        self, expression: str, graph: Graph, items: list, state: Mapping, check: list[Tensor], skips: Skips, ok
    ) -> Tensor | None:
        """The family's compiled step; returns its flag (the step kept). The step's first family
        checks the gradients in ``check`` and adds any skip to the device count; the others are
        given the flag as ``ok``. None when the compiler failed here (nothing has stepped)."""
        programs = [bucket.program for _, bucket, _ in items]
        found = key(expression, items)
        runner = self.runners.get(found)
        if runner is None:
            announce_compile(expression, sum(len(params) for _, _, params in items))
            runner = self.runners[found] = compiled(graph, programs)
        buckets = bucket_steps(items, state)
        lrs = [self._lr_tensor(group, params[0]) for group, _, params in items]
        try:
            if ok is None:
                return runner(buckets, lrs, check, skips.counter(check[0]))
            return runner(buckets, lrs, [], skips.counter(ok), ok)
        except Exception as error:  # a compiler that cannot run here (no C compiler, an unsupported op)
            if self.compile == "on":
                raise
            self.compile = "off"
            warnings.warn(
                f"opcomp: torch.compile failed ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                "this optimizer steps eagerly from now on (compile='off' silences this)",
                RuntimeWarning,
                stacklevel=6,
            )
            return None

    def _lr_tensor(self, group: dict, param: Tensor) -> Tensor:
        """The group's learning rate as a 0-d tensor in the parameters' working precision, refreshed
        every step: schedules never recompile."""
        found = (id(group), param.device, param.dtype)
        if found not in self.lr_tensors:
            self.lr_tensors[found] = torch.zeros((), dtype=working_dtype(param.dtype), device=param.device)
        tensor = self.lr_tensors[found]
        tensor.fill_(float(group["lr"]))
        return tensor


def key(expression: str, items: list) -> tuple:
    """A family's participation: which buckets step, with how many parameters."""
    return (expression, tuple((id(bucket), len(params)) for _, bucket, params in items))


def compiled(graph: Graph, programs: list[Program]) -> Callable:
    """:func:`guarded` compiled: inductor fuses each chain, its check and its keeping into few kernels."""
    return torch.compile(guarded(graph, programs))


def guarded(graph: Graph, programs: list[Program]) -> Callable:
    """:func:`~opcomp.step.eager.step_in_place` that keeps everything as it was unless ``ok``: the
    function torch.compile fuses, where the check is one reduction over the gradients and the
    keeping a select inside each update's own kernel (the values before are the inputs it reads
    anyway).

    ``check`` (the first family of a step): the gradients whose finiteness decides, with ``ok``
    then computed here; else ``ok`` is the families' before. Either way the step is kept only if
    also everything it wrote (parameters, state) is finite, and a refusal adds a skip to ``skips``.
    """

    def step(buckets: list[BucketStep], lrs: list[Tensor], check: list[Tensor], skips: Tensor, ok=None):
        given = flag(check) if ok is None else ok
        written = [t for program, bucket in zip(programs, buckets) for t in changing(program, bucket)]
        before = [t.clone() for t in written]
        step_in_place(graph, programs, buckets, lrs)
        ok = given & flag(written)  # the update and all it wrote: finite, or nothing lands
        skipped = ~ok if check else given & ~ok  # a family after the first counts only its own refusal
        skips.add_(skipped.to(skips.dtype))
        for tensor, old in zip(written, before):
            tensor.copy_(torch.where(ok, tensor, old))
        return ok

    return step


COMPILE_SECONDS_PER_TENSOR = 0.5
"""A cold compile's cost per parameter tensor, as measured on the CPU for the self-checking step:
0.3–0.5 s over 62–148 tensors (``python -m opcomp.bench.compile_cost``), more per tensor on
fewer."""


def announce_compile(expression: str, tensors: int) -> None:
    """One line before a first call compiles, so a long first step is never a silent one."""
    seconds = max(1, round(COMPILE_SECONDS_PER_TENSOR * tensors))
    warnings.warn(
        f"opcomp: compiling the fused step of {expression} over {tensors} tensors once, ~{seconds} s "
        "(later steps reuse it; compile='off' steps eagerly)",
        OpcompNotice,
        stacklevel=9,
    )
