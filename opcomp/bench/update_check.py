"""What an eager element-wise step pays for its promise: nothing lands unless the update and all
it wrote are finite.

    python -m opcomp.bench.update_check [--shapes small|gpt2|resnet18] [--steps 30] [--expr lion ...]

An eager element-wise family (``compile="off"``, or "auto" on the CPU) steps in place from a copy
of what it writes (the parameters and their nodes' state) and checks what it wrote, putting the
copy back if it must (docs/runtime.md). Rows, interleaved round by round, medians: torch's fused
AdamW; each expression's whole eager step; and that copy and check alone, on the same tensors —
the share of the step the promise costs.
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch

import opcomp
from opcomp.bench.step import SHAPES, interleaved
from opcomp.errors import OpcompError
from opcomp.finite import flag as finite_flag


def table(shapes_name: str, expressions: list[str], rounds: int) -> str:
    shapes = SHAPES[shapes_name]()
    generator = torch.Generator().manual_seed(0)

    def parameters() -> list[torch.nn.Parameter]:
        params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        return params

    reference = parameters()
    runs = {"torch AdamW fused": torch.optim.AdamW(reference, lr=1e-3, fused=True).step}
    written = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", opcomp.OpcompNotice)
        for expression in expressions:
            params = parameters()
            opt = opcomp.build(expression, params, lr=1e-3, compile="off")
            opt.step()  # the state exists
            tensors = params + [t for p in params for entry in opt.state[p].values() for t in entry.values() if t.ndim]
            runs[f"{expression}: eager step"] = opt.step
            runs[f"{expression}: its copy and check alone"] = _copy_and_check(tensors)
            written[expression] = tensors
    times = {name: statistics.median(samples) * 1e3 for name, samples in interleaved(runs, rounds, "cpu").items()}
    fused = times["torch AdamW fused"]
    lines = [
        f"{shapes_name}: {sum(torch.Size(s).numel() for s in shapes) / 1e6:.1f}M parameters in {len(shapes)} tensors, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {rounds} rounds",
        "",
        "| row | ms | × AdamW fused | share of the eager step |",
        "| --- | --- | --- | --- |",
    ]
    for name, ms in times.items():
        share = ""
        if name.endswith("alone"):
            step = times[name.replace("its copy and check alone", "eager step")]
            share = f"{ms / step:.0%}"
        lines.append(f"| {name} | {ms:.2f} | {ms / fused:.2f} | {share} |")
    return "\n".join(lines)


def _copy_and_check(tensors: list[torch.Tensor]):
    copies = [torch.empty_like(t) for t in tensors]

    def run() -> None:
        for copy, tensor in zip(copies, tensors):
            copy.copy_(tensor)
        bool(finite_flag(tensors))

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m opcomp.bench.update_check", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=list(SHAPES), default="small")
    parser.add_argument("--expr", nargs="+", default=["momentum(g)", "lion", "rms(g)"])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise OpcompError(f"--steps must be at least 1, got {args.steps}")
    print(table(args.shapes, args.expr, args.steps))


if __name__ == "__main__":
    main()
