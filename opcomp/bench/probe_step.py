"""Step time of probe expressions on the comparison models, rows interleaved round by round.

    python -m opcomp.bench.probe_step [--expr adagnoema gnvp(g) f3eo ...] [--rounds 5]

Each (model, expression) steps its own copy of the model through ``opt.step(closure)`` on a fixed
batch; one warm-up step creates the state, then every row takes one step per round. Medians in ms.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch.nn import functional as F

import opcomp
from opcomp.comparison.models import CharTransformer, cnn


def cases() -> list[tuple[str, torch.nn.Module, torch.Tensor, torch.Tensor]]:
    """(name, model, inputs, targets): the digits CNN on 64 images, the character transformer on
    16 sequences of 32 tokens."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    return [
        (
            "cnn 8×8",
            cnn(),
            torch.randn(64, 1, 8, 8, generator=generator),
            torch.randint(0, 10, (64,), generator=generator),
        ),
        (
            "char transformer",
            CharTransformer(60, width=64, depth=2, length=32),
            torch.randint(0, 60, (16, 32), generator=generator),
            torch.randint(0, 60, (16, 32), generator=generator),
        ),
    ]


def closure_for(model, inputs, targets):
    def closure():
        out = model(inputs)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1))

    return closure


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expr", nargs="+", default=["adagnoema", "gnvp(g)", "f3eo", "sam_sgd"])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    steps, samples = {}, {}
    for name, model, inputs, targets in cases():
        for expression in args.expr:
            copied = copy.deepcopy(model)
            opt = opcomp.build(expression, copied, lr=1e-4)
            closure = closure_for(copied, inputs, targets)
            opt.step(closure)
            steps[(name, expression)] = (opt, closure)
            samples[(name, expression)] = []
    for _ in range(args.rounds):
        for key, (opt, closure) in steps.items():
            start = time.perf_counter()
            opt.step(closure)
            samples[key].append(time.perf_counter() - start)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds} interleaved steps")
    print("")
    print("| model | expression | ms / step |")
    print("| --- | --- | --- |")
    for (name, expression), values in samples.items():
        print(f"| {name} | {expression} | {statistics.median(values) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
