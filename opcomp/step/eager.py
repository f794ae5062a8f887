"""The eager in-place route: an element-wise family's direction and update, written in place.

:func:`step_in_place` is also the function the compiled route hands to ``torch.compile``
(:mod:`opcomp.step.compiled`); eagerly, a step that can still be given up keeps what it writes
(:func:`opcomp.step.update.written`) in an :class:`~opcomp.state.Undo` first.
"""

from __future__ import annotations

from collections.abc import Mapping

from opcomp.distributed import DataParallel
from opcomp.graph import Graph
from opcomp.kernels.context import BucketStep
from opcomp.plan import Program
from opcomp.step.interpreter import Interpreter
from opcomp.step.update import Update, apply, bucket_steps


def step_in_place(
    graph: Graph, programs: list[Program], buckets: list[BucketStep], lrs: list, parallel: DataParallel | None = None
) -> None:
    """Every bucket's direction and its update, in place — the function torch.compile fuses (which
    it does without ``parallel``: every rank then computes every matrix itself)."""
    directions = Interpreter(graph, programs, buckets, parallel=parallel).run()
    for program, bucket, lr, direction in zip(programs, buckets, lrs, directions):
        apply(Update(lr, program, bucket, direction))


def run_eagerly(graph: Graph, items: list, state: Mapping, parallel: DataParallel | None = None) -> None:
    """A family's in-place items, stepped eagerly; matrix work is split among ``parallel``'s ranks."""
    if items:
        lrs = [float(g["lr"]) for g, _, _ in items]
        step_in_place(graph, [b.program for _, b, _ in items], bucket_steps(items, state), lrs, parallel)
