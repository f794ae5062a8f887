"""Are the recommended learning rates fair? Each against the lr ``--tune`` picks, on the built-in tasks.

    python -m opcomp.bench.lr_check [ENTRY ...] [--tasks digits mnist pydoc] [--steps 300] [--out lr_check.json]

For every entry (preset, expression, or optimizer class as ``opcomp compare`` takes them) and
task: the grid ``opcomp compare --tune`` trains on seed 0 (:func:`opcomp.comparison.runs.trials`
around :func:`~opcomp.comparison.runs.starting_lr`, the lr an untuned comparison uses: the
recommended rate for this kind of model, or a class's default), at the task's default budget.
A row says the recommended lr's final validation loss, the tuned lr's, and how much worse the
recommended one is; ``> 10%`` marks a rate a comparison would be unfair to. One seed's validation
loss is noisy on the small tasks, so a row over 10% is run again at both rates on seeds 1 and 2,
and the means over the three seeds decide it. Rows are appended to ``--out`` as they come, so a
long run can stop and resume.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from opcomp.bench.sweep import arguments, task_named
from opcomp.comparison.entries import entry
from opcomp.comparison.results import Settings
from opcomp.comparison.runs import starting_lr, train, trials

UNFAIR = 0.10  # a recommended lr this much worse than the tuned one (validation loss) is changed
TASKS = ("digits", "mnist", "pydoc", "fashion", "kjv", "gpt2", "resnet18")
CONFIRMING_SEEDS = (1, 2)


def checked(spec: str, task_spec: str, settings: Settings) -> dict:
    """One row: the recommended lr, the tuned lr, and every lr tried with its validation loss."""
    task, chosen = task_named(task_spec), entry(spec)
    start = starting_lr(chosen, task.seeded_model(0))
    runs = trials(task, chosen, start, 0, settings)
    tried = [[runs[k].lr, runs[k].score] for k in sorted(runs)]
    best = min(tried, key=lambda pair: pair[1])[0]
    return {"entry": chosen.name, "task": task_spec, "recommended": start, "tuned": best, "tried": tried}


def confirm(row: dict, settings: Settings) -> None:
    """Runs the row's recommended and tuned lr on :data:`CONFIRMING_SEEDS` too (in ``row["seeds"]``)."""
    task, chosen = task_named(row["task"]), entry(row["entry"])
    row["seeds"] = [
        [lr, [train(task, chosen, lr, seed, settings).score for seed in CONFIRMING_SEEDS]]
        for lr in (row["recommended"], row["tuned"])
    ]


def losses(row: dict) -> tuple[float, float]:
    """The recommended and the tuned lr's final validation loss: seed 0's, or the mean over every
    seed run where the row was confirmed (inf where a run diverged)."""
    seed_zero = dict(map(tuple, row["tried"]))
    more = {lr: scores for lr, scores in row.get("seeds", [])}
    return tuple(statistics.fmean([seed_zero[lr], *more.get(lr, [])]) for lr in (row["recommended"], row["tuned"]))


def worse(row: dict) -> float:
    """How much the recommended lr's final validation loss exceeds the tuned one's: inf where the
    recommended lr diverged, -inf where only the tuned one did (on a confirming seed)."""
    recommended, tuned = losses(row)
    if not math.isfinite(recommended):
        return math.inf
    return recommended / tuned - 1 if math.isfinite(tuned) else -math.inf


def gap_text(gap: float, digits: int) -> str:
    return "the tuned lr diverged on another seed" if gap == -math.inf else f"{gap:+.{digits}%}"


def line(row: dict) -> str:
    gap = worse(row)
    tried = ", ".join(
        f"{lr:.3g}: {loss:.4f}" if math.isfinite(loss) else f"{lr:.3g}: diverged" for lr, loss in row["tried"]
    )
    verdict = gap_text(gap, 1) + (" **> 10%**" if gap > UNFAIR else "") + (" (3 seeds)" if "seeds" in row else "")
    return f"| {row['entry']} | {row['task']} | {row['recommended']:.3g} | {row['tuned']:.3g} | {verdict} | {tried} |"


def cell(row: dict | None) -> str:
    """``recommended → tuned, gap`` for the summary table; bold where the gap is over 10%."""
    if row is None:
        return "—"
    gap = worse(row)
    text = f"{row['recommended']:.3g} → {row['tuned']:.3g}, {gap_text(gap, 0)}" + ("³" if "seeds" in row else "")
    return f"**{text}**" if gap > UNFAIR else text


def summary(rows: list[dict], entries: list[str], tasks: list[str]) -> list[str]:
    """One line per entry, one cell per task (³: decided on three seeds)."""
    lines = ["| optimizer | " + " | ".join(tasks) + " |", "| --- |" + " --- |" * len(tasks)]
    for name in entries:
        found = {r["task"]: r for r in rows if r["entry"] == name}
        lines.append(f"| {name} | " + " | ".join(cell(found.get(task)) for task in tasks) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv, __doc__, TASKS, "lr_check.json")
    entries = args.entries
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
            if worse(done[0]) > UNFAIR and "seeds" not in done[0] and done[0]["recommended"] != done[0]["tuned"]:
                confirm(done[0], Settings(steps=args.steps))
                out.write_text(json.dumps(rows, indent=1))
            print(line(done[0]), flush=True)
    print()
    print("recommended lr → tuned lr, the recommended one's validation loss over the tuned one's")
    print("\n".join(summary(rows, [entry(spec).name for spec in entries], args.tasks)))


if __name__ == "__main__":
    main()
