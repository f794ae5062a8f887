"""Learning-rate sweep: where the recommended learning rates come from.

    python -m opcomp.bench.sweep [PRESET_OR_EXPR ...] [--tasks digits:cnn-bn digits:mlp pydoc]
                                 [--steps 300] [--out sweep.json]

For every optimizer and task: :func:`opcomp.comparison.runs.trials` from its current recommended
lr — full runs of ``--steps`` steps (cosine schedule, a twentieth warm-up, seed 0) at lr × 3^k,
k = -1, 0, 1, extended while the best final validation loss lies on the grid's edge. Across
tasks, the lr chosen is the one with the lowest mean of validation loss over the task's best
(every task run at every lr it needs), lowered by factors of 3 while 3× it ends above the initial
validation loss (or diverges) on some task. Results are appended to ``--out`` as they come.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import warnings
from pathlib import Path

import torch

from opcomp.comparison.runs import Run, Settings, train, trials
from opcomp.comparison.tasks import Task, resolve
from opcomp.learning_rates import recommended_lr

TASKS = ("digits:cnn-bn", "digits:mlp", "pydoc")


def train_steps(task: Task, expression: str, lr: float, steps: int, seed: int = 0):
    """The validation loss after ``steps`` constant-lr closure steps over before (nan when it blew
    up), and the optimizer after training (to read its state): a quick look, not a tuning run."""
    model = task.seeded_model(seed)
    opt = task.build(expression, model, lr=lr)
    generator = torch.Generator().manual_seed(seed + 1)
    before = task.score(model, task.validation)[0]
    for _ in range(steps):
        x, y = task.batch(generator)
        opt.step(lambda: task.loss(model, x, y))  # noqa: B023 - used within the iteration
    after = task.score(model, task.validation)[0]
    return (after / before if math.isfinite(after) else math.nan), opt


def train_ratio(task: Task, expression: str, lr: float, steps: int, seed: int = 0) -> float:
    """:func:`train_steps`'s ratio alone."""
    return train_steps(task, expression, lr, steps, seed)[0]


def task_named(spec: str) -> Task:
    """``name`` or ``name:model`` (a built-in task with a built-in model)."""
    name, _, model = spec.partition(":")
    return resolve(name, model or None)


def sweep(expression: str, tasks: dict[str, Task], settings: Settings) -> tuple[float, dict[str, dict[int, Run]]]:
    """The chosen lr and every run, per task and k (lr = recommended × 3^k)."""
    center = recommended_lr(expression)
    runs = {name: trials(task, expression, center, 0, settings) for name, task in tasks.items()}
    everywhere = sorted(set().union(*(set(r) for r in runs.values())))
    for name, task in tasks.items():  # every k on every task, so the choice compares like with like
        for k in everywhere:
            if k not in runs[name]:
                runs[name][k] = train(task, expression, center * 3.0**k, 0, settings)

    def relative(k: int) -> float:
        ratios = []
        for by_k in runs.values():
            best = min(r.score for r in by_k.values())
            ratios.append(by_k[k].score / best if math.isfinite(best) else math.inf)
        return statistics.fmean(ratios)

    chosen = min(everywhere, key=relative)
    starts = {name: task.score(task.seeded_model(0), task.validation)[0] for name, task in tasks.items()}
    while chosen - 1 in everywhere and not all(
        by_k.get(chosen + 1) is None or by_k[chosen + 1].score < starts[name] for name, by_k in runs.items()
    ):
        chosen -= 1  # keep a factor of 3 between the recommendation and an lr that does not train
    return center * 3.0**chosen, runs


def arguments(argv: list[str] | None, doc: str, tasks, out: str) -> argparse.Namespace:
    """What the lr benches take: optimizers (``entries``; default every preset), ``--tasks``,
    ``--steps``, ``--out``. Coverage notices are silenced: the runs are many and the models small."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("entries", nargs="*", help="presets, expressions or optimizer classes (default: every preset)")
    parser.add_argument("--tasks", nargs="+", default=list(tasks), help="task or task:model")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default=out)
    args = parser.parse_args(argv)
    import opcomp

    warnings.filterwarnings("ignore", category=opcomp.OpcompWarning)
    args.entries = args.entries or sorted(opcomp.presets().names())
    return args


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv, __doc__, TASKS, "sweep.json")
    expressions = args.entries
    tasks = {spec: task_named(spec) for spec in args.tasks}
    settings = Settings(steps=args.steps)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    print(f"final validation loss after {args.steps} steps (cosine, seed 0) at each lr; chosen lr in bold")
    print("| optimizer | task | lr: validation loss | chosen |")
    print("| --- | --- | --- | --- |")
    for expression in expressions:
        chosen, runs = sweep(expression, tasks, settings)
        results[expression] = {
            "chosen": chosen,
            "tasks": {name: {f"{r.lr:.6g}": r.score for r in by_k.values()} for name, by_k in runs.items()},
        }
        out.write_text(json.dumps(results, indent=1))
        for name, by_k in runs.items():
            cells = ", ".join(
                f"{by_k[k].lr:.3g}: {by_k[k].score:.4f}"
                if math.isfinite(by_k[k].score)
                else f"{by_k[k].lr:.3g}: diverged"
                for k in sorted(by_k)
            )
            print(f"| {expression} | {name} | {cells} | {chosen:.3g} |", flush=True)


if __name__ == "__main__":
    main()
