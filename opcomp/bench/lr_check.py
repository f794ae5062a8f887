"""Are the recommended learning rates fair? Each against the lr ``--tune`` picks, on the built-in tasks.

    python -m opcomp.bench.lr_check [ENTRY ...] [--tasks digits mnist pydoc] [--steps 300] [--out lr_check.json]

For every entry (preset, expression, or optimizer class as ``opcomp compare`` takes them) and
task: the grid ``opcomp compare --tune`` trains on seed 0 (:func:`opcomp.comparison.runs.trials`
around :func:`~opcomp.comparison.runs.starting_lr`, the lr an untuned comparison uses: the
recommended rate for this kind of model, or a class's default), at the task's default budget.
A row says the recommended lr's final validation loss, the tuned lr's, and how much worse the
recommended one is; ``> 10%`` marks a rate a comparison would be unfair to. Rows are appended to
``--out`` as they come, so a long run can stop and resume.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

from opcomp.bench.sweep import task_named
from opcomp.comparison.entries import entry
from opcomp.comparison.results import Settings
from opcomp.comparison.runs import starting_lr, trials

UNFAIR = 0.10  # a recommended lr this much worse than the tuned one (validation loss) is changed
TASKS = ("digits", "mnist", "pydoc", "fashion", "kjv", "gpt2", "resnet18")


def checked(spec: str, task_spec: str, settings: Settings) -> dict:
    """One row: the recommended lr, the tuned lr, and every lr tried with its validation loss."""
    task, chosen = task_named(task_spec), entry(spec)
    start = starting_lr(chosen, task.seeded_model(0))
    runs = trials(task, chosen, start, 0, settings)
    tried = [[runs[k].lr, runs[k].score] for k in sorted(runs)]
    best = min(tried, key=lambda pair: pair[1])[0]
    return {"entry": chosen.name, "task": task_spec, "recommended": start, "tuned": best, "tried": tried}


def worse(row: dict) -> float:
    """How much the recommended lr's final validation loss exceeds the tuned one's (inf: it diverged)."""
    loss = dict(map(tuple, row["tried"]))
    recommended, tuned = loss[row["recommended"]], loss[row["tuned"]]
    return recommended / tuned - 1 if math.isfinite(recommended) else math.inf


def line(row: dict) -> str:
    gap = worse(row)
    tried = ", ".join(
        f"{lr:.3g}: {loss:.4f}" if math.isfinite(loss) else f"{lr:.3g}: diverged" for lr, loss in row["tried"]
    )
    verdict = f"{gap:+.1%}" + (" **> 10%**" if gap > UNFAIR else "")
    return f"| {row['entry']} | {row['task']} | {row['recommended']:.3g} | {row['tuned']:.3g} | {verdict} | {tried} |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("entries", nargs="*", help="presets, expressions or optimizer classes (default: every preset)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), help="task or task:model")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="lr_check.json")
    args = parser.parse_args(argv)
    import opcomp

    warnings.filterwarnings("ignore", category=opcomp.OpcompWarning)
    entries = args.entries or sorted(opcomp.presets().names())
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.exists() else []
    print(f"final validation loss after {args.steps} steps (cosine, seed 0): recommended lr against tuned")
    print("| optimizer | task | recommended | tuned | recommended's loss over tuned's | lr: validation loss |")
    print("| --- | --- | --- | --- | --- | --- |")
    for spec in entries:
        for task_spec in args.tasks:
            done = [r for r in rows if r["entry"] == entry(spec).name and r["task"] == task_spec]
            if not done:
                done = [checked(spec, task_spec, Settings(steps=args.steps))]
                rows += done
                out.write_text(json.dumps(rows, indent=1))
            print(line(done[0]), flush=True)


if __name__ == "__main__":
    main()
