"""How often AWZO's curvature estimate falls below its rounding floor, per perturbation size.

    python -m opcomp.bench.awzo_floor [--eps 1e-3 1e-2 ...] [--lrs 0.3 1 3] [--steps 100] [--task digits]

``zo[relative, newton]`` divides its slope by the three-point curvature |L⁺ + L⁻ − 2L₀|/eps², floored
at ten times what the losses' rounding leaves resolvable (40·|L|·eps_machine/eps²). Where the floor
binds, the "Newton" scale is that constant and says nothing about the loss. For each eps: the share
of probes floored (from the node's ``floored`` counter), and the validation loss after training
over before (lower is better) at each learning rate.
"""

from __future__ import annotations

import argparse

from opcomp.bench.sweep import train_steps
from opcomp.comparison.tasks import TASKS


def floored_share(opt, steps: int) -> float:
    """Floored probes over probes, read from the zo node's counters (one per parameter; all equal)."""
    state = next(iter(opt.state.values()))
    (entry,) = [buffers for key, buffers in state.items() if key.startswith("zo[")]
    return float(entry.get("floored", 0.0)) / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eps", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--task", default="digits", choices=sorted(TASKS))
    args = parser.parse_args(argv)
    task = TASKS[args.task]()
    print(f"{args.task}, {args.steps} steps of zo[relative, newton, eps=…]; loss after / before at each lr")
    print("| eps | floored probes | " + " | ".join(f"lr {lr:g}" for lr in args.lrs) + " |")
    print("| --- | --- |" + " --- |" * len(args.lrs))
    for eps in args.eps:
        expression = f"zo[relative, newton, eps={eps}]"
        ratios, share = [], None
        for lr in args.lrs:
            ratio, opt = train_steps(task, expression, lr, args.steps)
            ratios.append(ratio)
            share = floored_share(opt, args.steps) if share is None else share
        print(f"| {eps:g} | {share:.0%} | " + " | ".join(f"{r:.4f}" for r in ratios) + " |")


if __name__ == "__main__":
    main()
