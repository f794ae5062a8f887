"""Do the presets' recommended learning rates train the models people use? ResNet-18 and GPT-2.

    python -m opcomp.bench.preset_lrs [PRESET ...] [--tasks resnet18 gpt2] [--steps 30] [--factors 1 0.3 0.1]

For every preset and task: :func:`opcomp.bench.sweep.train_ratio` (the validation loss after
``--steps`` steps over before, same seeded model and batches) at the
preset's recommended lr for the task's kind of model times each factor. Below 1 it trained; above 1 or nan, it did not.
"""

from __future__ import annotations

import argparse

import opcomp
from opcomp.bench.sweep import task_named, train_ratio
from opcomp.learning_rates import model_kind, recommended_lr


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", help="presets (default: all)")
    parser.add_argument("--tasks", nargs="+", default=["resnet18", "gpt2"], help="task or task:model")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--factors", type=float, nargs="+", default=[1.0, 0.3, 0.1])
    args = parser.parse_args(argv)
    namespace = opcomp.presets()
    names = args.presets or sorted(namespace.names())
    tasks = {name: task_named(name) for name in args.tasks}
    print(f"validation loss after {args.steps} steps / before, at the preset's lr × factor")
    print("| preset | lr | task | " + " | ".join(f"× {f:g}" for f in args.factors) + " |")
    print("| --- | --- | --- |" + " --- |" * len(args.factors))
    for name in names:
        for task_name, task in tasks.items():
            lr = recommended_lr(name, namespace, model_kind(task.seeded_model(0)))
            ratios = [train_ratio(task, name, lr * factor, args.steps) for factor in args.factors]
            cells = " | ".join(f"{r:.3f}" for r in ratios)
            print(f"| {name} | {lr:g} | {task_name} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
