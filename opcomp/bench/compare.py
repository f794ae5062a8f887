"""``opcomp compare``: train one model per optimizer on the same data, initialisation and batches.

    opcomp compare [PRESET_OR_EXPR ...] [--task digits] [--steps 300 | --epochs E] [--seed 0]
                   [--device cpu] [--out opcomp-compare] [--lr LR] [--tune] [--model cnn|mlp]

With no optimizers it compares fog, diagfog, f3eo, fs_adarmsuon, adagnoema, muon_adamw and adamw
on scikit-learn's digits, which needs no download and takes about a minute on two CPU cores.
Every optimizer runs through ``opt.step(closure)``, so probes and plain optimizers train alike.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import opcomp
from opcomp.bench.footprint import passes_on, state_bytes
from opcomp.bench.tasks import TASKS, Task
from opcomp.errors import OpcompError

DEFAULT_OPTIMIZERS = ["fog", "diagfog", "f3eo", "fs_adarmsuon", "adagnoema", "muon_adamw", "adamw"]


@dataclass
class Run:
    optimizer: str
    lr: float
    steps: int
    history: list[tuple[int, float, float]] = field(default_factory=list)  # (step, training seconds, loss)
    train_loss: float = math.nan  # on a fixed training batch, after training
    validation_loss: float = math.nan
    metric: str = "accuracy"
    metric_value: float = math.nan
    seconds: float = 0.0
    ms_per_step: float = 0.0
    state_mb: float = 0.0
    passes: str = ""
    finished: bool = True  # false when the loss stopped being finite


def train(task: Task, expression: str, lr: float, steps: int, seed: int, device: str, progress=None) -> Run:
    """One optimizer on the task: seeded model and batches, ``steps`` closure steps, then measured."""
    model = task.model(seed).to(device)
    opt = task.build(expression, model, lr=lr)
    generator = torch.Generator().manual_seed(seed + 1)
    run = Run(expression, lr, steps, metric=task.metric, passes=passes_on(expression, model))
    every = max(1, steps // 60)
    total, count, spent = 0.0, 0, 0.0
    for step in range(1, steps + 1):
        x, y = (t.to(device) for t in task.batch(generator))
        start = time.perf_counter()
        loss = float(opt.step(lambda: task.loss(model, x, y)))  # noqa: B023 - used within the iteration
        spent += time.perf_counter() - start
        if not math.isfinite(loss):
            run.finished = False
            break
        total, count = total + loss, count + 1
        if step % every == 0 or step == steps:
            run.history.append((step, spent, total / count))
            total, count = 0.0, 0
        if progress is not None:
            progress.update(1)
    done = run.history[-1][0] if run.history else 0
    run.seconds, run.ms_per_step = spent, spent / max(done, 1) * 1e3
    run.state_mb = state_bytes(opt) / 2**20
    if run.finished:
        x, y = (t.to(device) for t in task.measure)
        run.train_loss = task.score(model, x, y)[0]
        if task.validation is not None:
            vx, vy = (t.to(device) for t in task.validation)
            run.validation_loss, run.metric_value = task.score(model, vx, vy)
    return run


def recommended(expression: str) -> float:
    from opcomp.builder import recommended_lr

    return recommended_lr(expression, opcomp.presets())


def tune(task: Task, expression: str, steps: int, seed: int, device: str) -> float:
    """The best of the recommended lr × {1/3, 1, 3} after a fifth of the steps, by validation loss."""
    base = recommended(expression)
    trials = [(train(task, expression, base * f, max(steps // 5, 20), seed, device), base * f) for f in (1 / 3, 1, 3)]
    finite = [(run.validation_loss, lr) for run, lr in trials if run.finished and math.isfinite(run.validation_loss)]
    return min(finite)[1] if finite else base


def compare(optimizers, task: Task, steps: int, seed: int, device: str, lr: float | None, tuned: bool) -> list[Run]:
    bar = _progress(len(optimizers) * steps)
    runs = []
    for expression in optimizers:
        rate = (
            lr if lr is not None else tune(task, expression, steps, seed, device) if tuned else recommended(expression)
        )
        if bar is not None:
            bar.set_description(expression)
        runs.append(train(task, expression, rate, steps, seed, device, bar))
    if bar is not None:
        bar.close()
    return runs


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="step", leave=False, disable=None)  # no bar when not on a terminal


def check_device(name: str) -> torch.device:
    """The device ``--device`` names, if this machine has it; an OpcompError that says which exist."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise OpcompError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OpcompError(f"--device {name}: this machine has no CUDA device; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise OpcompError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    if device.type not in ("cpu", "cuda"):
        raise OpcompError(f"--device {name}: opcomp compare runs on cpu or cuda")
    return device


def table(runs: list[Run]) -> str:
    metric = runs[0].metric
    lines = [
        f"| optimizer | lr | train loss | validation loss | {metric} | wall s | ms / step | state MB | passes / step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        value = f"{r.metric_value:.4f}" if metric == "accuracy" else f"{r.metric_value:.3f}"
        status = "" if r.finished else " (diverged)"
        lines.append(
            f"| {r.optimizer}{status} | {r.lr:g} | {r.train_loss:.4f} | {r.validation_loss:.4f} | {value} | "
            f"{r.seconds:.1f} | {r.ms_per_step:.1f} | {r.state_mb:.1f} | {r.passes} |"
        )
    return "\n".join(lines)


def plot(runs: list[Run], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, index, label in (("loss_vs_step.png", 0, "step"), ("loss_vs_time.png", 1, "training seconds")):
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for run in runs:
            if run.history:
                axes.plot([h[index] for h in run.history], [h[2] for h in run.history], label=run.optimizer)
        axes.set_xlabel(label)
        axes.set_ylabel("training loss (mean since last point)")
        axes.set_yscale("log")
        axes.set_title(title)
        axes.legend()
        figure.tight_layout()
        figure.savefig(out / name, dpi=120)
        plt.close(figure)
        paths.append(out / name)
    return paths


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="opcomp compare", description=__doc__.splitlines()[0])
    parser.add_argument(
        "optimizers", nargs="*", help="presets or expressions (default: the seven of the research notes)"
    )
    parser.add_argument("--task", default="digits", choices=sorted(TASKS))
    parser.add_argument("--model", default=None, choices=["cnn", "mlp"], help="for image tasks (default cnn)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None)
    length.add_argument("--epochs", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="opcomp-compare")
    parser.add_argument("--lr", type=float, default=None, help="one learning rate for all (default: each preset's)")
    parser.add_argument("--tune", action="store_true", help="sweep lr × {1/3, 1, 3} per optimizer first")
    args = parser.parse_args(argv)
    check_device(args.device)
    if args.steps is not None and args.steps < 1:
        raise OpcompError(f"--steps must be at least 1, got {args.steps}")
    if args.epochs is not None and not args.epochs > 0:
        raise OpcompError(f"--epochs must be positive, got {args.epochs:g}")
    task = TASKS[args.task](args.model) if args.model else TASKS[args.task]()
    steps = args.steps if args.steps else max(1, round(args.epochs * task.steps_per_epoch)) if args.epochs else 300
    optimizers = args.optimizers or DEFAULT_OPTIMIZERS
    runs = compare(optimizers, task, steps, args.seed, args.device, args.lr, args.tune)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"task": task.name, "steps": steps, "seed": args.seed, "device": args.device, "tuned": args.tune}
    (out / "results.json").write_text(json.dumps({**settings, "runs": [asdict(r) for r in runs]}, indent=2))
    pictures = plot(runs, out, f"{task.name}, {steps} steps, seed {args.seed}")
    report = table(runs)
    return f"{report}\n\nwrote {out / 'results.json'}, " + ", ".join(str(p) for p in pictures)
