"""``opcomp compare``: train one model per optimizer and seed on the same data, initialisation and
batches; choose learning rates on validation data; score the test set once.

    opcomp compare [PRESET_OR_EXPR ...] [--task digits | NAME | module:function | text:PATH]
                   [--model cnn|mlp|resnet|transformer|transformer-large] [--steps 300 | --epochs E]
                   [--seeds 0,1,2] [--schedule cosine|constant] [--warmup N] [--lr LR] [--tune]
                   [--target VALUE] [--device cpu] [--out opcomp-compare]

With no optimizers it compares fog, diagfog, f3eo, fs_adarmsuon, adagnoema, muon_adamw and adamw
on scikit-learn's digits, which needs no download and takes under a minute on two CPU cores.
Every optimizer runs through ``opt.step(closure)``, so probes and plain optimizers train alike.
From Python: ``opcomp.compare(["fog", "adamw"], task=my_task, steps=500, seeds=(0, 1, 2))``.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from opcomp.comparison.entries import Entry, entry
from opcomp.comparison.footprint import passes_on, state_bytes
from opcomp.comparison.report import Comparison
from opcomp.comparison.results import WARM_UP, Run, Settings, Tuning
from opcomp.comparison.tasks import Task
from opcomp.errors import OpcompError
from opcomp.learning_rates import model_kind, recommended_lr

DEFAULT_OPTIMIZERS = ["fog", "diagfog", "f3eo", "fs_adarmsuon", "adagnoema", "muon_adamw", "adamw"]
SCHEDULES = ("cosine", "constant")
EVALUATIONS = 20
"""Validation evaluations per run, evenly spaced: what time to target is read from."""


def lr_factor(schedule: str, warmup: int, steps: int) -> Callable[[int], float]:
    """The multiplier of the base lr before step ``t + 1``: linear warm-up over ``warmup`` steps,
    then constant or a cosine decay to zero at the last step."""

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        if schedule == "constant" or steps <= warmup:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (t - warmup) / (steps - warmup)))

    return factor


def stepper(task: Task, chosen: Entry, model, opt) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """One training step on a batch, returning its loss: opcomp's ``opt.step(closure)`` (which
    runs its own backward, and probes re-evaluate), or torch.optim's zero_grad, backward, step."""
    if chosen.is_opcomp:
        return lambda x, y: float(opt.step(lambda: task.loss(model, x, y)))

    def step(x, y) -> float:
        opt.zero_grad()
        loss = task.loss(model, x, y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def train(task: Task, optimizer, lr: float, seed: int, settings: Settings, progress=None) -> Run:
    """One optimizer (an :func:`~opcomp.comparison.entries.entry`) on the task: seeded model and
    batches, ``settings.steps`` steps under the schedule (set through the optimizer's param groups,
    as an LR scheduler does), the validation set scored ``EVALUATIONS`` times (not counted as
    training time)."""
    device, steps = settings.device, settings.steps
    chosen = entry(optimizer)
    model = task.seeded_model(seed).to(device)
    opt = task.build(chosen.name, model, lr=lr) if chosen.is_opcomp else chosen.build(model, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(settings.schedule, settings.warmup_steps, steps))
    generator = torch.Generator().manual_seed(seed + 1)
    validation = tuple(t.to(device) for t in task.validation)
    passes = passes_on(chosen.name, model) if chosen.is_opcomp else "1 forward, 1 backward"
    run = Run(chosen.name, lr, seed, steps, passes=passes)
    step_on = stepper(task, chosen, model, opt)
    log_every, evaluate_every = max(1, steps // 60), max(1, steps // EVALUATIONS)
    total, count, spent, durations = 0.0, 0, 0.0, []
    for step in range(1, steps + 1):
        x, y = (t.to(device) for t in task.batch(generator))
        start = time.perf_counter()
        loss = step_on(x, y)
        scheduler.step()
        durations.append(time.perf_counter() - start)
        spent += durations[-1]
        if progress is not None:
            progress.update(1)
        if not math.isfinite(loss):
            run.finished = False
            break
        total, count = total + loss, count + 1
        if step % log_every == 0 or step == steps:
            run.history.append((step, spent, total / count))
            total, count = 0.0, 0
        if step % evaluate_every == 0 or step == steps:
            value_loss, value = task.score(model, validation)
            run.evaluations.append((step, spent, value_loss, value))
            if run.steps_to_target is None and task.reached(value):
                run.steps_to_target, run.seconds_to_target = step, spent
    run.seconds, run.warmup_steps = spent, warm_up(durations)
    steady = durations[run.warmup_steps :]
    run.warmup_seconds, run.ms_per_step = sum(durations[: run.warmup_steps]), statistics.fmean(steady or [0.0]) * 1e3
    run.state_mb = state_bytes(opt) / 2**20
    if run.finished and run.evaluations:
        run.validation_loss, run.validation_metric = run.evaluations[-1][2:]
        if not math.isfinite(run.validation_loss):
            run.finished = False
    if run.finished and task.test is not None:
        run.test_loss, run.test_metric = task.score(model, tuple(t.to(device) for t in task.test))
    return run


def warm_up(durations: list[float]) -> int:
    """How many of the first steps are warm-up: each over :data:`WARM_UP` times the median step, as
    a step that compiles is (heavyball's SOAP took 120 s for its first two steps on a CPU and 20 ms
    for each after). ms / step is the mean over the steps after them, so a class that compiles on
    its first call is not ranked by its compiler; a refresh every few steps (fog's inverses) stays
    in it. The last step is never warm-up."""
    if len(durations) < 3:
        return 0
    typical, count = statistics.median(durations), 0
    while count < len(durations) - 1 and durations[count] > WARM_UP * typical:
        count += 1
    return count


def starting_lr(chosen: Entry, model: nn.Module) -> float:
    """The lr an entry runs at untuned (and the centre of its tuning grid): an expression's
    recommended lr for this kind of model, a class's own default."""
    return recommended_lr(chosen.name, kind=model_kind(model)) if chosen.is_opcomp else chosen.own_lr(model)


def tune(
    task: Task, expression, center: float, seed: int, settings: Settings, progress=None, extensions: int = 4
) -> tuple[Tuning, Run]:
    """The lr with the lowest final validation loss over the full budget, among center × {1/3, 1, 3}
    and, while the best lies on the grid's edge, up to ``extensions`` more steps of 3 past it.
    Returns the tuning and the chosen run (it is the first seed's result)."""
    runs = trials(task, expression, center, seed, settings, progress, extensions)
    best = min(runs, key=lambda k: runs[k].score)
    tried = [(runs[k].lr, runs[k].score) for k in sorted(runs)]
    return Tuning(entry(expression).name, runs[best].lr, tried), runs[best]


def trials(
    task: Task, expression, center: float, seed: int, settings: Settings, progress=None, extensions: int = 4
) -> dict[int, Run]:
    """Runs at center × 3^k by k, from k = -1, 0, 1, extended past the edge holding the best."""
    runs: dict[int, Run] = {}
    for k in (-1, 0, 1):
        runs[k] = train(task, expression, center * 3.0**k, seed, settings, progress)
    for _ in range(extensions):
        best = min(sorted(runs), key=lambda k: runs[k].score)
        if math.isinf(runs[best].score) or best == min(runs):  # nothing trained, or the smallest did best
            k = min(runs) - 1
        elif best == max(runs):
            k = max(runs) + 1
        else:
            break
        runs[k] = train(task, expression, center * 3.0**k, seed, settings, progress)
    return runs


def compare(
    optimizers: Sequence[str] | None = None,
    task: Task | str = "digits",
    steps: int = 300,
    seeds: Sequence[int] = (0,),
    lr: float | None = None,
    tune_lr: bool = False,
    schedule: str = "cosine",
    warmup: int | None = None,
    target: float | None = None,
    device: str = "cpu",
    model: str | None = None,
) -> Comparison:
    """Train each optimizer on ``task`` for ``steps`` steps, once per seed.

    ``optimizers``: presets, expressions, rule files, optimizer classes by import path
    (``"torch.optim.AdamW"``, ``"heavyball.SOAP[precondition_frequency=10]"``) or ``(name,
    factory)`` pairs with ``factory(params) -> Optimizer`` (:mod:`opcomp.comparison.entries`).
    ``task``: a :class:`~opcomp.comparison.tasks.Task`, a built-in task's name, ``"module:function"``
    (a function returning a Task) or ``"text:PATH"``. Each optimizer runs at ``lr``, or its
    recommended lr, or with ``tune_lr`` the best of a grid around that (chosen on the first seed's
    validation loss at the full budget, extended while the best is on the grid's edge). ``target``
    overrides the task's validation target for the time-to-target columns.
    """
    from opcomp.comparison.tasks import resolve

    if schedule not in SCHEDULES:
        raise OpcompError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if steps < 1:
        raise OpcompError(f"steps must be at least 1, got {steps}")
    if warmup is not None and not 0 <= warmup <= steps:
        raise OpcompError(f"warmup must be between 0 and the {steps} steps, got {warmup}")
    seeds = checked_seeds(seeds, "seeds")
    if steps > MAX_STEPS:
        raise OpcompError(f"steps must be at most {MAX_STEPS:,}, got {steps:,}")
    check_device(device)
    task = resolve(task, model) if isinstance(task, str) else task
    if target is not None:
        task = replace(task, target=target)
    settings = Settings(steps, schedule, warmup, device)
    entries = [entry(optimizer) for optimizer in (optimizers or DEFAULT_OPTIMIZERS)]
    model = task.seeded_model(seeds[0])
    starts = {e.name: starting_lr(e, model) for e in entries}  # every class entry is refused or not before training
    foreign = {e.name: starts[e.name] for e in entries if not e.is_opcomp}
    bar = _progress(len(entries) * len(seeds) * steps)
    runs, tunings = [], []
    for chosen in entries:
        expression = chosen.name
        if bar is not None:
            bar.set_description(expression)
        rate, first = lr if lr is not None else starts[expression], None
        if tune_lr:
            tuning, first = tune(task, chosen, rate, seeds[0], settings, bar)
            tunings.append(tuning)
            rate = tuning.chosen
        for seed in seeds:
            runs.append(
                first if first is not None and seed == seeds[0] else train(task, chosen, rate, seed, settings, bar)
            )
    if bar is not None:
        bar.close()
    kind = model_kind(model)
    return Comparison(task.name, task.metric, task.target, settings, list(seeds), runs, tunings, foreign, kind)


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


MAX_SEEDS = 1000
"""Seeds one comparison runs at most (each is a full training run per optimizer)."""
MAX_STEPS = 10_000_000
"""Steps one run takes at most: ``--epochs 1e300`` is a mistake, not a plan."""
SEED_LIMIT = 2**63
"""torch.manual_seed takes seeds below this."""


def seeds_from(text: str) -> list[int]:
    """``--seeds 0,1,2`` (or ``0-2``) as a list of ints: at most ``MAX_SEEDS``, each one torch can seed."""
    try:
        if "-" in text.strip("-") and "," not in text:
            first, last = (int(part) for part in text.split("-"))
            if last - first + 1 > MAX_SEEDS:
                raise OpcompError(
                    f"--seeds {text} asks for {last - first + 1:,} seeds; a comparison runs at most {MAX_SEEDS}"
                )
            seeds = list(range(first, last + 1))
        else:
            seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise OpcompError(f"--seeds takes integers separated by commas, e.g. 0,1,2; got {text!r}") from None
    return checked_seeds(seeds, "--seeds")


def checked_seeds(seeds: Sequence[int], where: str) -> list[int]:
    if not seeds:
        raise OpcompError(f"{where}: give at least one seed")
    if len(seeds) > MAX_SEEDS:
        raise OpcompError(f"{where}: {len(seeds):,} seeds; a comparison runs at most {MAX_SEEDS}")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
            raise OpcompError(f"{where}: seed {seed!r} is not an integer from 0 to 2**63 - 1")
    return list(seeds)


def steps_of(epochs: float, steps_per_epoch: int) -> int:
    """``--epochs`` as steps: a positive, finite number of passes that gives at most ``MAX_STEPS``."""
    if not (math.isfinite(epochs) and epochs > 0):
        raise OpcompError(f"--epochs must be positive and finite, got {epochs:g}")
    if epochs * steps_per_epoch > MAX_STEPS:
        raise OpcompError(
            f"--epochs {epochs:g} is {epochs * steps_per_epoch:.3g} steps of this task; a run takes at most "
            f"{MAX_STEPS:,}"
        )
    return max(1, round(epochs * steps_per_epoch))


def main(argv: list[str] | None = None) -> str:
    import argparse

    from opcomp.comparison.report import NO_PLOTS, plots_available
    from opcomp.comparison.tasks import MODELS, TASKS

    parser = argparse.ArgumentParser(prog="opcomp compare", description=__doc__.splitlines()[0])
    parser.add_argument(
        "optimizers",
        nargs="*",
        help="presets, expressions, rule files or optimizer classes: torch.optim.AdamW, "
        "heavyball.SOAP[precondition_frequency=10], my_module:MyOptimizer (default: the seven of the research notes)",
    )
    parser.add_argument(
        "--task", default="digits", help=f"{', '.join(sorted(TASKS))}, module:function (a Task) or text:PATH"
    )
    parser.add_argument("--model", default=None, choices=MODELS, help="a built-in model for a built-in task")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="training steps per run (default 300)")
    length.add_argument("--epochs", type=float, default=None, help="or passes over the training data")
    seeding = parser.add_mutually_exclusive_group()
    seeding.add_argument("--seeds", default="0", help="seeds to run and average, e.g. 0,1,2 (default 0)")
    seeding.add_argument("--seed", type=int, default=None, help="one seed")
    parser.add_argument("--schedule", default="cosine", choices=SCHEDULES, help="lr schedule (default cosine)")
    parser.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default: steps / 20)")
    parser.add_argument("--lr", type=float, default=None, help="one learning rate for all (default: each one's)")
    parser.add_argument("--tune", action="store_true", help="choose each lr on validation loss, grid × 3 around it")
    parser.add_argument("--target", type=float, default=None, help="validation metric to time (default: the task's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="opcomp-compare")
    args = parser.parse_args(argv)
    from opcomp.comparison.tasks import resolve

    if args.steps is not None and not 1 <= args.steps <= MAX_STEPS:
        raise OpcompError(f"--steps must be at least 1 and at most {MAX_STEPS:,}, got {args.steps}")
    if args.epochs is not None and not (math.isfinite(args.epochs) and args.epochs > 0):
        raise OpcompError(f"--epochs must be positive and finite, got {args.epochs:g}")
    seeds = checked_seeds([args.seed], "--seed") if args.seed is not None else seeds_from(args.seeds)
    check_device(args.device)
    writable(args.out)
    if not plots_available():
        print(f"opcomp compare: {NO_PLOTS}", file=sys.stderr)
    task = resolve(args.task, args.model)
    steps = steps_of(args.epochs, task.steps_per_epoch) if args.epochs is not None else args.steps or 300
    comparison = compare(
        args.optimizers, task, steps, seeds, args.lr, args.tune, args.schedule, args.warmup, args.target, args.device
    )
    written = comparison.write(args.out)
    return f"{comparison.table()}\n\nwrote " + ", ".join(str(p) for p in written)


def writable(out: str) -> None:
    """``--out`` can take the report: checked before anything trains, not after."""
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".opcomp-write-check"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise OpcompError(f"--out {out}: cannot write there ({error.strerror}); give a folder you can write") from None
