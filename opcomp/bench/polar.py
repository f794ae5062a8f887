"""How close ``orth``'s Newton–Schulz lands to the polar factor, per coefficient schedule.

    python -m opcomp.bench.polar [--shape 128 512] [--conditions 10 1000] [--steps 5 8]

For matrices with singular values spread log-uniformly from 1 down to 1/condition (random
singular vectors, seed 0): the range of the result's singular values (1 is the polar factor's)
and its relative distance to U·Vᵀ from the SVD, for Jordan's fixed quintic and Polar Express's
per-step ones. Both cost the same three matrix products a step.
"""

from __future__ import annotations

import argparse

import torch

from opcomp.kernels.matrix import newton_schulz


def spread(rows: int, cols: int, condition: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix of the given conditioning and its polar factor."""
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=generator))
    singular = torch.logspace(0, -torch.log10(torch.tensor(float(condition))).item(), k)
    return (u * singular) @ v.T, u @ v.T


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=[128, 512])
    parser.add_argument("--conditions", type=float, nargs="+", default=[10.0, 1000.0])
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 8])
    args = parser.parse_args(argv)
    rows, cols = args.shape
    print(f"{rows} × {cols}, bfloat16 iteration")
    print("| condition | coefficients | steps | singular values | distance to U·Vᵀ |")
    print("| --- | --- | --- | --- | --- |")
    for condition in args.conditions:
        x, polar = spread(rows, cols, condition, torch.Generator().manual_seed(0))
        for coefficients in ("jordan", "polar_express"):
            for steps in args.steps:
                result = newton_schulz(x[None], steps, coefficients)[0].float()
                singular = torch.linalg.svdvals(result)
                distance = torch.linalg.norm(result - polar) / torch.linalg.norm(polar)
                print(
                    f"| {condition:g} | {coefficients} | {steps} | {singular.min():.3f}–{singular.max():.3f} "
                    f"| {distance:.3f} |"
                )


if __name__ == "__main__":
    main()
