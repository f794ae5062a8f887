"""What opcomp's capture hooks do to a compiled model: graphs and graph breaks by torch._dynamo.explain.

    python -m opcomp.bench.graph_breaks [--models mlp transformer] [--expr adamw fog]

For each model of :mod:`opcomp.bench.kfac` and expression: one training step settles the plan
(and so which layers are hooked), then ``torch._dynamo.explain`` traces the loss's forward and
counts the graphs and the breaks, grouped by the file and line dynamo broke at. ``adamw`` puts
nothing on the forward path and is the baseline: every break beyond its count is the capture's.
"""

from __future__ import annotations

import argparse
import collections
import warnings

import torch._dynamo as dynamo

import opcomp
from opcomp.bench.kfac import task
from opcomp.comparison.report import table_cell


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "transformer"], choices=["mlp", "transformer", "resnet"])
    parser.add_argument("--expr", nargs="+", default=["adamw", "fog"])
    args = parser.parse_args(argv)
    print("| model | expression | graphs | graph breaks | where (count) |")
    print("| --- | --- | --- | --- | --- |")
    for kind in args.models:
        for expression in args.expr:
            graphs, count, reasons = breaks(kind, expression)
            where = "; ".join(f"{w}: {r} ({n})" for (w, r), n in reasons.most_common(4)) or "—"
            print(f"| {kind} | {expression} | {graphs} | {count} | {table_cell(where)} |", flush=True)


if __name__ == "__main__":
    main()
