"""When KFAC's products pay for batching: G⁻¹ X A⁻¹ per layer, and the factors' averaged grams.

    python -m opcomp.bench.preconditioning [--repeats 200] [--device cpu]

For groups of layers of one shape, the two products of each layer in turn against one pair of
batched products over the group, the stacking of X and both inverses included (the state keeps
each layer's inverses apart): medians in microseconds, interleaved. ``kernels.decompositions.BATCHED``
is the longest side up to which opcomp batches. Then the same for folding a step's gram into a
factor's average, decay·S + (1 − decay)·RᵀR / n: ``addmm`` per layer (what
``layers.statistics.mean_gram`` does) against one ``baddbmm`` over the stacked rows and averages.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from opcomp.bench.step import interleaved
from opcomp.kernels.decompositions import BATCHED

GROUPS = ((16, 64, 64), (8, 128, 128), (4, 128, 256), (4, 256, 256), (2, 512, 128), (12, 192, 192), (4, 384, 384))
"""(layers, out, in) of each group, from the sizes that batch well to those that do not."""

GRAM_GROUPS = ((16, 64, 64), (9, 64, 288), (12, 256, 128), (12, 1008, 65), (12, 1008, 129), (4, 1008, 513))
"""(layers, rows, columns) of each group of grams: a CNN's reduced rows (one per example) to a
transformer's (one per position of 16 sequences of 63)."""


def looped_and_batched(ways: dict, repeats: int, device: str) -> tuple[float, float, float]:
    """Medians in microseconds of the ``looped`` and ``batched`` way, interleaved after a warm-up,
    and looped ÷ batched."""
    interleaved(ways, 10, device)
    samples = interleaved(ways, repeats, device)
    looped, batched = (statistics.median(samples[name]) * 1e6 for name in ("looped", "batched"))
    return looped, batched, looped / batched


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    print(f"{torch.get_num_threads()} threads, device {args.device}, median of {args.repeats}, BATCHED = {BATCHED}")
    print()
    print("| layers × (out, in) | looped µs | batched µs | looped ÷ batched | opcomp batches |")
    print("| --- | --- | --- | --- | --- |")
    for count, out, inputs in GROUPS:
        g = [torch.randn(out, out, device=args.device) for _ in range(count)]
        a = [torch.randn(inputs, inputs, device=args.device) for _ in range(count)]
        x = [torch.randn(out, inputs, device=args.device) for _ in range(count)]
        ways = {
            "looped": lambda g=g, x=x, a=a: [gi @ xi @ ai for gi, xi, ai in zip(g, x, a)],
            "batched": lambda g=g, x=x, a=a: (torch.stack(g) @ torch.stack(x) @ torch.stack(a)).unbind(),
        }
        looped, batched, ratio = looped_and_batched(ways, args.repeats, args.device)
        chosen = "yes" if max(out, inputs) <= BATCHED else "no"
        print(f"| {count} × ({out}, {inputs}) | {looped:.0f} | {batched:.0f} | {ratio:.2f} | {chosen} |")
    print()
    print("| layers × (rows, columns) | looped µs | batched µs | looped ÷ batched | multiply-adds per gram |")
    print("| --- | --- | --- | --- | --- |")
    for count, rows, columns in GRAM_GROUPS:
        r = [torch.randn(rows, columns, device=args.device) for _ in range(count)]
        s = [torch.randn(columns, columns, device=args.device) for _ in range(count)]
        weight = 0.05 / rows
        ways = {
            "looped": lambda r=r, s=s, w=weight: [torch.addmm(a, b.T, b, beta=0.95, alpha=w) for a, b in zip(s, r)],
            "batched": lambda r=r, s=s, w=weight: torch.baddbmm(
                torch.stack(s), torch.stack(r).mT, torch.stack(r), beta=0.95, alpha=w
            ).unbind(),
        }
        looped, batched, ratio = looped_and_batched(ways, args.repeats, args.device)
        print(f"| {count} × ({rows}, {columns}) | {looped:.0f} | {batched:.0f} | {ratio:.2f} | {rows * columns**2:,} |")


if __name__ == "__main__":
    main()
