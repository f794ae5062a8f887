"""What compiling the fused step costs and what it saves, per model shape: the steps to break even.

    python -m opcomp.bench.compile_cost [--shapes small resnet18 ...] [--expr adamw(g) ...] [--rounds 20]

For each shape set and expression: the step that compiles (the second: the first steps eagerly
and makes the state), from an empty inductor cache (a fresh ``TORCHINDUCTOR_CACHE_DIR``) and again
with that cache filled, as a later run on the same machine finds it (``torch._dynamo`` reset
before each); then eager and compiled steps interleaved round by round (medians). Break-even is
the cold compile's seconds over the milliseconds saved per step: a run of fewer steps is faster
eager. ``compile="auto"`` decides from this table (docs/performance.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

import opcomp
from opcomp.bench.step import SHAPES, interleaved, parameters, stepper, synchronize
from opcomp.comparison.report import table_cell


def compiling_step(shapes, device: str, expression: str) -> tuple[float, torch.optim.Optimizer]:
    """Seconds of the step that compiles (after the eager first), and the optimizer for more."""
    torch._dynamo.reset()
    opt = opcomp.build(expression, parameters(shapes, device), lr=1e-3, compile="on")
    step = stepper(opt)
    step()
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start, opt


def row(shapes_name: str, device: str, expression: str, rounds: int) -> str:
    shapes = SHAPES[shapes_name]()
    total = sum(torch.Size(s).numel() for s in shapes)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        compile_seconds, compiled = compiling_step(shapes, device, expression)
        cached_seconds, _ = compiling_step(shapes, device, expression)
        del os.environ["TORCHINDUCTOR_CACHE_DIR"]
    eager = opcomp.build(expression, parameters(shapes, device), lr=1e-3, compile="off")
    steps = {"eager": stepper(eager), "compiled": stepper(compiled)}
    for step in steps.values():
        step()
    samples = interleaved(steps, rounds, device)
    eager_ms, compiled_ms = (statistics.median(samples[name]) * 1e3 for name in ("eager", "compiled"))
    saved = eager_ms - compiled_ms
    even = f"{compile_seconds * 1e3 / saved:,.0f}" if saved > 0 else "never"
    return (
        f"| {shapes_name} | {total / 1e6:.1f}M in {len(shapes)} | {table_cell(expression)} | {compile_seconds:.1f} | "
        f"{cached_seconds:.1f} | "
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
        "| shapes | parameters in tensors | expression | compiling step, s | with the inductor cache, s "
        "| eager ms | compiled ms | speed-up | break-even steps |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for shapes_name in args.shapes:
        for expression in args.expr:
            print(row(shapes_name, args.device, expression, args.rounds), flush=True)


if __name__ == "__main__":
    main()
