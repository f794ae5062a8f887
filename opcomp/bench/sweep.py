"""Learning-rate sweep: how far each optimizer lowers a task's loss in a few steps, per lr.

    python -m opcomp.bench.sweep [PRESET_OR_EXPR ...] [--tasks digits pydoc] [--steps 30]

For every optimizer, task and learning rate: the same seeded model and batches, ``--steps``
steps through ``opt.step(closure)``, and the loss on the task's fixed batch after training divided
by the loss before (lower is better; above 1 means it got worse, "nan" that it blew up).
"""

from __future__ import annotations

import argparse
import math

import torch

import opcomp
from opcomp.bench.tasks import TASKS, Task

GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def train(task: Task, expression: str, lr: float, steps: int, seed: int = 0) -> float:
    """Measured loss after training / before; nan when it stopped being finite."""
    return train_steps(task, expression, lr, steps, seed)[0]


def train_steps(task: Task, expression: str, lr: float, steps: int, seed: int = 0) -> tuple[float, opcomp.Optimizer]:
    """The ratio of :func:`train`, and the optimizer after training (to read its state)."""
    model = task.model(seed)
    opt = task.build(expression, model, lr=lr)
    generator = torch.Generator().manual_seed(seed + 1)
    x, y = task.measure
    with torch.no_grad():
        before = float(task.loss(model, x, y))
    for _ in range(steps):
        opt.step(closure_for(task, model, task.batch(generator)))
    with torch.no_grad():
        after = float(task.loss(model, x, y))
    return (after / before if math.isfinite(after) else math.nan), opt


def closure_for(task: Task, model, batch):
    """The closure of one training batch: it returns the loss, opcomp runs the backward."""
    return lambda: task.loss(model, *batch)


def sweep(expressions, tasks, steps: int, grid=GRID) -> dict[tuple[str, str, float], float]:
    return {
        (expression, name, lr): train(TASKS[name](), expression, lr, steps)
        for expression in expressions
        for name in tasks
        for lr in grid
    }


def best(results: dict, expression: str, tasks, grid=GRID) -> float:
    """The lr with the lowest mean ratio over the tasks, among those finite on every task."""

    def score(lr: float) -> float:
        ratios = [results[(expression, name, lr)] for name in tasks]
        return math.inf if any(math.isnan(r) for r in ratios) else sum(ratios) / len(ratios)

    return min(grid, key=score)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("expressions", nargs="*", help="presets or expressions (default: every preset)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--grid", nargs="+", type=float, default=list(GRID), help="learning rates to try")
    args = parser.parse_args(argv)
    expressions = args.expressions or opcomp.presets().names()
    grid = tuple(args.grid)
    results = sweep(expressions, args.tasks, args.steps, grid)
    header = " | ".join(f"{lr:g}" for lr in grid)
    print(f"loss after {args.steps} steps / loss before, on each task's fixed batch")
    print(f"| optimizer | task | {header} | best lr |")
    print("| --- | --- | " + " | ".join("---" for _ in grid) + " | --- |")
    for expression in expressions:
        chosen = best(results, expression, args.tasks, grid)
        for name in args.tasks:
            cells = " | ".join(f"{results[(expression, name, lr)]:.3f}" for lr in grid)
            print(f"| {expression} | {name} | {cells} | {chosen:g} |")


if __name__ == "__main__":
    main()
