"""What opcomp's capture hooks do to a compiled model: graphs and graph breaks by torch._dynamo.explain.

    python -m opcomp.bench.graph_breaks [--models mlp transformer gpt2] [--expr adamw fog] [--rounds 30]

For each model of :mod:`opcomp.bench.kfac` (and a tiny Hugging Face GPT-2) and expression: one
training step settles the plan (and so which layers are hooked), then ``torch._dynamo.explain``
traces the loss's forward and counts the graphs and the breaks, grouped by the file and line
dynamo broke at. ``adamw`` puts nothing on the forward path and is the baseline: every break
beyond its count is the capture's.

With ``--rounds``, then what the capture costs a compiled model (``torch.compile``, inductor):
forward + backward of the model built with adamw (no hooks) and with fog, its capture armed (a
step whose statistics are due) and disarmed, rows interleaved, medians in ms.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import warnings

import torch
import torch._dynamo as dynamo

import opcomp
from opcomp.bench import kfac
from opcomp.bench.step import interleaved
from opcomp.comparison import models
from opcomp.comparison.report import table_cell


def task(kind: str):
    """:func:`opcomp.bench.kfac.task`'s models, and ``gpt2``: a tiny Hugging Face GPT-2 (2 blocks,
    width 64) on the transformer's batch."""
    if kind != "gpt2":
        return kfac.task(kind)
    _, loss = kfac.task("transformer")
    return (lambda: models.Logits(models.gpt2_lm(96, 64, layers=2, width=64, heads=2))), loss


def breaks(kind: str, expression: str) -> tuple[int, int, collections.Counter]:
    """Graphs, graph breaks and their reasons (file:line, first line of the reason) -> count."""
    make, loss = task(kind)
    dynamo.reset()
    model = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = opcomp.build(expression, model)
        loss(model).backward()
        opt.step()
        opt.zero_grad()
        explanation = dynamo.explain(lambda: loss(model))()
    reasons = collections.Counter()
    for found in explanation.break_reasons:
        frame = found.user_stack[-1] if found.user_stack else None
        where = f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}" if frame else "?"
        reasons[(where, found.reason.splitlines()[0][:100])] += 1
    return explanation.graph_count, explanation.graph_break_count, reasons


def compiled_passes(kind: str, rounds: int) -> dict[str, list[float]]:
    """Seconds per compiled forward + backward: without hooks, and with fog's capture armed and disarmed."""
    make, loss = task(kind)
    dynamo.reset()
    plain, hooked = make(), make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opcomp.build("adamw", plain)
        fog = opcomp.build("fog", hooked)
    capture, compiled_plain, compiled_fog = fog._capture, torch.compile(plain), torch.compile(hooked)

    def passing(compiled, armed: bool):
        def run() -> None:
            capture.armed = armed
            loss(compiled).backward()
            capture.clear()

        return run

    timed = {
        "no capture (adamw)": passing(compiled_plain, True),
        "fog, armed": passing(compiled_fog, True),
        "fog, disarmed": passing(compiled_fog, False),
    }
    for run in timed.values():  # compiles, and warms the caches
        run()
        run()
    return interleaved(timed, rounds, "cpu", alternate=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["mlp", "transformer", "gpt2"], choices=["mlp", "transformer", "resnet", "gpt2"]
    )
    parser.add_argument("--expr", nargs="+", default=["adamw", "fog"])
    parser.add_argument("--rounds", type=int, default=0, help="time compiled passes too, over this many rounds")
    args = parser.parse_args(argv)
    print("| model | expression | graphs | graph breaks | where (count) |")
    print("| --- | --- | --- | --- | --- |")
    for kind in args.models:
        for expression in args.expr:
            graphs, count, reasons = breaks(kind, expression)
            where = "; ".join(f"{w}: {r} ({n})" for (w, r), n in reasons.most_common(4)) or "—"
            print(f"| {kind} | {expression} | {graphs} | {count} | {table_cell(where)} |", flush=True)

    if not args.rounds:
        return
    print()
    print(f"compiled forward + backward, median of {args.rounds} rounds, {torch.get_num_threads()} threads")
    print("| model | no capture (adamw), ms | fog armed, ms | × | fog disarmed, ms | × |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind in args.models:
        samples = {k: 1e3 * statistics.median(v) for k, v in compiled_passes(kind, args.rounds).items()}
        plain, armed, disarmed = samples.values()
        print(f"| {kind} | {plain:.2f} | {armed:.2f} | {armed / plain:.2f} | {disarmed:.2f} | {disarmed / plain:.2f} |")


if __name__ == "__main__":
    main()
