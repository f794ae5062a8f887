"""Which convolutional networks want smaller learning rates? The measurement behind the large-CNN kind.

    python -m opcomp.bench.cnn_rates [--models NAME ...] [--runs ENTRY:LR ...] [--seeds 0 1 2] [--out F]

Every entry at each fixed rate on each network, at the default budget (300 steps, cosine), on
every seed; a cell is the mean final validation loss over the seeds (the score ``--tune`` and
:mod:`opcomp.bench.lr_check` compare). The networks are ResNets of several depths and widths and
the small CNN, on the resnet18 task's MNIST images unless named otherwise, so that size, depth and
data can be told apart (docs/presets.md, "Rates for large CNNs"). Runs are appended to ``--out``
as they finish, so a long run can stop and resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import warnings
from collections.abc import Callable
from pathlib import Path

from torch import nn

from opcomp.comparison import models, tasks
from opcomp.comparison.entries import entry
from opcomp.comparison.results import Settings
from opcomp.comparison.runs import train
from opcomp.comparison.tasks import Task


def on_mnist(build: Callable[[], nn.Module]) -> Callable[[], Task]:
    return lambda: dataclasses.replace(tasks.mnist("resnet18"), model=build)


NETWORKS: dict[str, tuple[str, Callable[[], Task]]] = {  # name: (what it is, its task)
    "resnet18-fashion": ("ResNet-18 on Fashion-MNIST (batches of 128)", lambda: tasks.fashion("resnet18")),
    "resnet10": (
        "ResNet-10: widths 64–512, one block a stage",
        on_mnist(lambda: models.ResNet(widths=(64, 128, 256, 512), blocks=(1, 1, 1, 1), channels=1)),
    ),
    "resnet18-half": (
        "ResNet-18 at half width (32–256)",
        on_mnist(lambda: models.ResNet(widths=(32, 64, 128, 256), blocks=(2, 2, 2, 2), channels=1)),
    ),
    "resnet-3x3": (
        "three stages of three blocks, widths 32–128",
        on_mnist(lambda: models.ResNet(widths=(32, 64, 128), blocks=(3, 3, 3), channels=1)),
    ),
    "resnet-small": ("the fashion task's ResNet (32–128, a block a stage)", lambda: tasks.mnist("resnet")),
    "cnn-bn": ("the small CNN with batch norm", lambda: tasks.mnist("cnn-bn")),
}
RUNS = ("adamw:0.03", "adamw:0.01", "adamw:0.0033", "sgd:0.3", "sgd:0.1")


def size(task: Task) -> tuple[int, int]:
    """The network's parameters and convolutions."""
    model = task.seeded_model(0)
    convolutions = sum(1 for m in model.modules() if isinstance(m, nn.Conv2d))
    return sum(p.numel() for p in model.parameters()), convolutions


def table(results: list[list], networks: list[str], runs: list[str], seeds: list[int]) -> list[str]:
    """One line per network, one cell per entry:lr: the mean over the seeds run (their count where
    fewer than asked)."""
    scores: dict[tuple, list[float]] = {}
    for network, spec, lr, seed, score in results:
        if seed in seeds:
            scores.setdefault((network, spec, lr), []).append(score)
    lines = [
        "| network | parameters | convolutions | " + " | ".join(runs) + " |",
        "| --- | --- | --- |" + " --- |" * len(runs),
    ]
    for network in networks:
        label, task = NETWORKS[network]
        parameters, convolutions = size(task())
        cells = []
        for run in runs:
            spec, lr = run.rsplit(":", 1)
            found = scores.get((network, spec, float(lr)), [])
            partial = f" ({len(found)} of {len(seeds)} seeds)" if found and len(found) < len(seeds) else ""
            cells.append(f"{statistics.fmean(found):.3f}{partial}" if found else "—")
        lines.append(f"| {label} | {parameters / 1e6:.2f}M | {convolutions} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--runs", nargs="+", default=list(RUNS), help="entry:lr, e.g. adamw:0.003")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="cnn_rates.json")
    args = parser.parse_args(argv)
    import opcomp

    warnings.filterwarnings("ignore", category=opcomp.OpcompWarning)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else []
    for network in args.models:
        task = NETWORKS[network][1]()
        for seed in args.seeds:
            for run in args.runs:
                spec, lr = run.rsplit(":", 1)
                key = [network, spec, float(lr), seed]
                if any(r[:4] == key for r in results):
                    continue
                score = train(task, entry(spec), float(lr), seed, Settings(steps=args.steps)).score
                results.append([*key, score])
                out.write_text(json.dumps(results, indent=1))
                print(key, f"{score:.4f}", flush=True)
    print(f"mean final validation loss after {args.steps} steps (cosine) over seeds {args.seeds}")
    print("\n".join(table(results, args.models, args.runs, args.seeds)))


if __name__ == "__main__":
    main()
