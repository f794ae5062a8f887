"""A comparison written down: one markdown report with its table and plots embedded, results.json
with every run, and the plots as PNG files."""

from __future__ import annotations

import base64
import importlib.util
import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from opcomp.comparison.results import WARM_UP, Run, Settings, Tuning
from opcomp.comparison.ties import Verdict, verdict
from opcomp.learning_rates import DEFAULT, LARGE_CNN, LARGE_CNN_PARAMETERS, TRANSFORMER


@dataclass
class Comparison:
    """Every run of a comparison, with what it was asked."""

    task: str
    metric: str
    target: float | None
    settings: Settings
    seeds: list[int]
    runs: list[Run]
    tuning: list[Tuning] = field(default_factory=list)
    foreign: dict[str, float] = field(default_factory=dict)  # class entries: the lr each sets itself
    kind: str = DEFAULT  # the model's kind, which picks the recommended rates (learning_rates.model_kind)

    def runs_of(self, optimizer: str) -> list[Run]:
        return [r for r in self.runs if r.optimizer == optimizer]

    @property
    def optimizers(self) -> list[str]:
        return list(dict.fromkeys(r.optimizer for r in self.runs))

    def table(self) -> str:
        return table(self)

    def write(self, out) -> list:
        """report.md (table and plots embedded), results.json and the plots as PNG files under ``out``."""
        return write(self, out)


def table_cell(text: str) -> str:
    """``text`` inside a markdown table cell: the bars of a fallback (``a | b``) escaped."""
    return text.replace("|", "\\|")


def stats(values) -> dict:
    """Mean and standard deviation over seeds of the finite values (std 0 for one, mean nan for none)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    return {
        "mean": statistics.fmean(values) if values else math.nan,
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def spread(values, digits: int = 4) -> str:
    """``mean ± standard deviation`` over seeds (just the value for one seed); ``—`` for none."""
    summed = stats(values)
    if not summed["n"]:
        return "—"
    if summed["n"] == 1:
        return f"{summed['mean']:.{digits}f}"
    return f"{summed['mean']:.{digits}f} ± {summed['std']:.{digits}f}"


def summary(comparison: Comparison, optimizer: str) -> dict:
    """The seeds of one optimizer aggregated: means and standard deviations, how many finished and
    how many reached the target."""
    runs = comparison.runs_of(optimizer)
    finished = [r for r in runs if r.finished]
    reached = [r for r in finished if r.steps_to_target is not None]
    return {
        "optimizer": optimizer,
        "lr": runs[0].lr,
        "runs": len(runs),
        "finished": len(finished),
        "reached_target": len(reached),
        **{
            name: stats([getattr(r, name) for r in finished])
            for name in ("validation_loss", "validation_metric", "test_loss", "test_metric", "ms_per_step")
        },
        "steps_to_target": stats([r.steps_to_target for r in reached]),
        "seconds_to_target": stats([r.seconds_to_target for r in reached]),
    }


def judged(comparison: Comparison) -> Verdict | None:
    """Which optimizers the seeds cannot tell from the best on the test metric (:mod:`.ties`)."""
    values = {o: [r.test_metric for r in comparison.runs_of(o) if r.finished] for o in comparison.optimizers}
    return verdict(values, higher_is_better=comparison.metric == "accuracy")


def step_costs(comparison: Comparison) -> dict[str, float]:
    """Each optimizer's median ms per step over the fastest one's."""
    medians = {o: statistics.median([r.ms_per_step for r in comparison.runs_of(o)]) for o in comparison.optimizers}
    fastest = min((m for m in medians.values() if m > 0), default=0.0)
    return {o: m / fastest if fastest else math.nan for o, m in medians.items()}


def table(comparison: Comparison) -> str:
    metric, target = comparison.metric, comparison.target
    goal = "—" if target is None else f"{metric} {'≥' if metric == 'accuracy' else '≤'} {target:g}"
    digits = 4 if metric == "accuracy" else 3
    decided, costs = judged(comparison), step_costs(comparison)
    lines = [
        f"| optimizer | lr | validation loss | test loss | test {metric} | vs best | steps to {goal} | "
        "seconds to target | ms / step | × fastest step | state MB | passes / step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for optimizer in comparison.optimizers:
        runs = comparison.runs_of(optimizer)
        finished = [r for r in runs if r.finished]
        reached = [r for r in finished if r.steps_to_target is not None]
        name = (
            optimizer
            if len(finished) == len(runs)
            else f"{optimizer} (diverged {len(runs) - len(finished)}/{len(runs)})"
        )
        of = "" if not reached or len(reached) == len(runs) else f" ({len(reached)}/{len(runs)} reached)"
        steps = spread([r.steps_to_target for r in reached], 0) + of if target is not None else "—"
        seconds = spread([r.seconds_to_target for r in reached], 1) if target is not None else "—"
        lines.append(
            f"| {name} | {runs[0].lr:.3g} | {spread([r.validation_loss for r in finished])} | "
            f"{spread([r.test_loss for r in finished])} | {spread([r.test_metric for r in finished], digits)} | "
            f"{decided.mark(optimizer) if decided and finished else '—'} | {steps} | {seconds} | "
            f"{spread([r.ms_per_step for r in runs], 1)} | {costs[optimizer]:.2f} | {runs[0].state_mb:.2f} | "
            f"{runs[0].passes} |"
        )
    return "\n".join(lines)


def warm_ups(comparison: Comparison) -> str | None:
    """The runs whose first steps were warm-up (:func:`~opcomp.comparison.runs.warm_up`), in words;
    None when none had any."""
    slow = [run for run in comparison.runs if run.warmup_steps]
    if not slow:
        return None
    each = "; ".join(
        f"{run.optimizer}, seed {run.seed}: {run.warmup_steps} step{'s' * (run.warmup_steps > 1)} "
        f"in {run.warmup_seconds:.1f} s"
        for run in slow
    )
    return (
        f"Warm-up, left out of ms / step (first steps over {WARM_UP:g} times the run's median step: a compilation "
        f"or a first call's setup): {each}. Seconds to target and the wall-clock plot include it."
    )


def tuning_table(comparison: Comparison) -> str:
    """The learning rates tried per optimizer and their final validation losses (first seed)."""
    lines = ["| optimizer | lr: validation loss (chosen in bold) |", "| --- | --- |"]
    for tuning in comparison.tuning:
        cells = [
            (f"**{lr:.3g}: {loss:.4f}**" if lr == tuning.chosen else f"{lr:.3g}: {loss:.4f}")
            if math.isfinite(loss)
            else f"{lr:.3g}: diverged"
            for lr, loss in tuning.tried
        ]
        lines.append(f"| {tuning.optimizer} | {', '.join(cells)} |")
    return "\n".join(lines)


def mean_curve(runs: list[Run], series: str, x: int, y: int) -> tuple[list[float], list[float]]:
    """The seeds' curves averaged point by point, over the points every finished seed has."""
    curves = [getattr(r, series) for r in runs if r.finished and getattr(r, series)]
    if not curves:
        return [], []
    length = min(len(c) for c in curves)
    return (
        [statistics.fmean(c[i][x] for c in curves) for i in range(length)],
        [statistics.fmean(c[i][y] for c in curves) for i in range(length)],
    )


KIND_REASONS = {  # why a comparison's recommended rates are not the default ones (learning_rates.model_kind)
    TRANSFORMER: "its transformer rates: the model has token embeddings or attention",
    LARGE_CNN: f"its rates for large CNNs: the model has convolutions and {LARGE_CNN_PARAMETERS:,} parameters or more",
}
NO_PLOTS = "matplotlib is not installed, so the report has no plots: pip install 'opcomp[bench]' adds them"


def plots_available() -> bool:
    """Whether matplotlib can draw the report's plots (the bench extra); without it the report is
    written with its tables alone and says so."""
    return importlib.util.find_spec("matplotlib") is not None


def plot(comparison: Comparison, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, seeds = comparison.metric, len(comparison.seeds)
    title = f"{comparison.task}, {comparison.settings.steps} steps, mean of {seeds} seed{'s' * (seeds > 1)}"
    figures = (
        ("loss_vs_step.png", "history", 0, 2, "step", "training loss (mean since last point)", True),
        (
            "validation_vs_time.png",
            "evaluations",
            1,
            3,
            "training seconds",
            f"validation {metric}",
            metric != "accuracy",
        ),
    )
    paths = []
    for name, series, x, y, xlabel, ylabel, logarithmic in figures:
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for optimizer in comparison.optimizers:
            xs, ys = mean_curve(comparison.runs_of(optimizer), series, x, y)
            if xs:
                axes.plot(xs, ys, label=optimizer)
        if series == "evaluations" and comparison.target is not None:
            axes.axhline(comparison.target, color="grey", linestyle=":", label="target")
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        if logarithmic:
            axes.set_yscale("log")
        axes.set_title(title)
        axes.legend()
        figure.tight_layout()
        figure.savefig(out / name, dpi=110)
        plt.close(figure)
        paths.append(out / name)
    return paths


def markdown(comparison: Comparison, pictures: list[Path]) -> str:
    s = comparison.settings
    tuned = (
        "tuned on the first seed's validation loss"
        if comparison.tuning
        else "NOT tuned: each as given or recommended. An untuned comparison favours whoever's default lr "
        "happens to fit this task and model; run with --tune before reading a ranking into it"
    )
    if comparison.kind in KIND_REASONS:
        tuned += f" (opcomp's recommended rates are {KIND_REASONS[comparison.kind]})"
    decided = judged(comparison)
    lines = [
        f"# {comparison.task}: {', '.join(comparison.optimizers)}",
        "",
        decided.sentence(comparison.metric) if decided else "No run finished.",
        "",
        f"{s.steps} steps, {s.schedule} schedule with {s.warmup_steps} warm-up steps, seeds "
        f"{', '.join(map(str, comparison.seeds))}, on {s.device}; learning rates {tuned}. Validation data "
        "comes from the training data; the test set was scored once, after training. Columns with ± are the "
        'mean and standard deviation over seeds; time excludes validation. "vs best": tied where Welch\'s '
        "t-test over seeds does not separate an optimizer's test metric from the best one's at 95%; "
        '"ms / step": the mean step after warm-up; "× fastest step": its median over seeds, over the fastest '
        "entry's.",
        "",
        comparison.table(),
        "",
    ]
    if warm := warm_ups(comparison):
        lines += [warm, ""]
    if comparison.foreign:
        own = ", ".join(f"{name} {lr:g}" for name, lr in comparison.foreign.items())
        lines += [
            f"Optimizer classes start from the lr each sets itself (its default, or the lr= given): {own}; "
            "the schedule scales it through their param groups' lr, as an LR scheduler does.",
            "",
        ]
    if comparison.tuning:
        lines += ["## Learning rates tried", "", tuning_table(comparison), ""]
    if not plots_available():
        lines += [f"{NO_PLOTS}.", ""]
    for picture in pictures:
        encoded = base64.b64encode(picture.read_bytes()).decode("ascii")
        lines += [f"![{picture.stem}](data:image/png;base64,{encoded})", ""]
    return "\n".join(lines)


def write(comparison: Comparison, out) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "task": comparison.task,
        "metric": comparison.metric,
        "target": comparison.target,
        "settings": {**asdict(comparison.settings), "warmup_steps": comparison.settings.warmup_steps},
        "seeds": comparison.seeds,
        "summary": [summary(comparison, o) for o in comparison.optimizers],
        "tuning": [asdict(t) for t in comparison.tuning],
        "runs": [asdict(r) for r in comparison.runs],
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    pictures = plot(comparison, out) if plots_available() else []
    (out / "report.md").write_text(markdown(comparison, pictures))
    return [out / "report.md", out / "results.json", *pictures]
