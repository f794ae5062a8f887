"""How close ``orth``'s Newton–Schulz lands to the polar factor, per coefficient schedule.

    python -m opcomp.bench.polar [--shape 128 512] [--conditions 10 1000] [--steps 5 8] [--repeats 15]

For matrices with singular values spread log-uniformly from 1 down to 1/condition (random
singular vectors, seed 0): the range of the result's singular values (1 is the polar factor's)
and its relative distance to U·Vᵀ from the SVD, for Jordan's fixed quintic, Polar Express's
per-step ones (both three matrix products a step) and Jordan's in Gram form. Then the time of
one 5-step iteration per matrix shape, standard and Gram form interleaved (median of
``--repeats``), on the shapes of MLP and attention weights.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from opcomp.kernels.matrix import newton_schulz


def spread(rows: int, cols: int, condition: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix of the given conditioning and its polar factor."""
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=generator))
    singular = torch.logspace(0, -torch.log10(torch.tensor(float(condition))).item(), k)
    return (u * singular) @ v.T, u @ v.T


VARIANTS = (("jordan", False), ("polar_express", False), ("jordan", True))
TIMED_SHAPES = ((512, 512), (512, 1024), (256, 1024), (512, 2048), (768, 2304), (768, 3072))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=[128, 512])
    parser.add_argument("--conditions", type=float, nargs="+", default=[10.0, 1000.0])
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 8])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    rows, cols = args.shape
    print(f"{rows} × {cols}, bfloat16 iteration")
    print("| condition | coefficients | form | steps | singular values | distance to U·Vᵀ |")
    print("| --- | --- | --- | --- | --- | --- |")
    for condition in args.conditions:
        x, polar = spread(rows, cols, condition, torch.Generator().manual_seed(0))
        for coefficients, gram in VARIANTS:
            for steps in args.steps:
                result = newton_schulz(x[None], steps, coefficients, gram)[0].float()
                singular = torch.linalg.svdvals(result)
                distance = torch.linalg.norm(result - polar) / torch.linalg.norm(polar)
                print(
                    f"| {condition:g} | {coefficients} | {'gram' if gram else 'standard'} | {steps} "
                    f"| {singular.min():.3f}–{singular.max():.3f} | {distance:.3f} |"
                )
    print(f"\n5 steps of Jordan's quintic, ms per matrix (median of {args.repeats}, interleaved)")
    print("| shape | standard | gram | gram ÷ standard |")
    print("| --- | --- | --- | --- |")
    for shape in TIMED_SHAPES:
        x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
        standard, gram = timed(x, args.repeats)
        print(f"| {shape[0]} × {shape[1]} | {standard:.1f} | {gram:.1f} | {gram / standard:.2f} |")


def timed(x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median ms of the standard and the Gram iteration, run alternately (which goes first alternates
    too) after one warm-up each. A square matrix iterates as usual under both: the control."""
    times: dict[bool, list[float]] = {False: [], True: []}
    for repeat in range(repeats + 1):
        for gram in (False, True) if repeat % 2 else (True, False):
            start = time.perf_counter()
            newton_schulz(x, 5, "jordan", gram)
            if repeat:
                times[gram].append(1e3 * (time.perf_counter() - start))
    return statistics.median(times[False]), statistics.median(times[True])


if __name__ == "__main__":
    main()
