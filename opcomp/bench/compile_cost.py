"""What compiling the fused step costs and what it saves, per model shape: the steps to break even.

    python -m opcomp.bench.compile_cost [--shapes small resnet18 ...] [--expr adamw(g) ...] [--rounds 20]

For each shape set and expression: the first compiled step from a cold cache (``torch._dynamo``
reset first; the compile's seconds), then eager and compiled steps interleaved round by round
(medians). Break-even is the compile's seconds over the milliseconds saved per step: a run of
fewer steps is faster eager. ``compile="auto"`` decides from this table (docs/performance.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import opcomp
from opcomp.bench.step import SHAPES, parameters, stepper, synchronize


def cold_first_step(shapes, device: str, expression: str) -> tuple[float, torch.optim.Optimizer]:
    """Seconds of the first compiled step (the compile included), and the optimizer for more."""
    torch._dynamo.reset()
    opt = opcomp.build(expression, parameters(shapes, device), lr=1e-3, compile="on")
    step = stepper(opt)
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start, opt


def row(shapes_name: str, device: str, expression: str, rounds: int) -> str:
    shapes = SHAPES[shapes_name]()
    total = sum(torch.Size(s).numel() for s in shapes)
    compile_seconds, compiled = cold_first_step(shapes, device, expression)
    eager = opcomp.build(expression, parameters(shapes, device), lr=1e-3, compile="off")
    steps = {"eager": stepper(eager), "compiled": stepper(compiled)}
    for step in steps.values():
        step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    eager_ms, compiled_ms = (statistics.median(samples[name]) * 1e3 for name in ("eager", "compiled"))
    saved = eager_ms - compiled_ms
    even = f"{compile_seconds * 1e3 / saved:,.0f}" if saved > 0 else "never"
    return (
        f"| {shapes_name} | {total / 1e6:.1f}M in {len(shapes)} | {expression} | {compile_seconds:.1f} | "
        f"{eager_ms:.1f} | {compiled_ms:.1f} | {eager_ms / compiled_ms:.2f} | {even} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["small", "resnet18"], choices=sorted(SHAPES))
    parser.add_argument("--expr", nargs="+", default=["adamw(g)"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    print(
        f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {args.rounds} interleaved steps"
    )
    print("")
    print(
        "| shapes | parameters in tensors | expression | first step, s | eager ms | compiled ms | speed-up "
        "| break-even steps |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for shapes_name in args.shapes:
        for expression in args.expr:
            print(row(shapes_name, args.device, expression, args.rounds), flush=True)


if __name__ == "__main__":
    main()
