"""Time optimizer steps side by side, in one run, on parameters shaped like a transformer.

    python -m opcomp.bench.step [--params 10e6] [--steps 20] [--device cpu]

Every optimizer steps the same parameter shapes with fixed random gradients; the rows are
interleaved round by round so machine noise hits them alike. Prints the median step time and its
ratio to torch.optim.AdamW(fused=True) (and, for Muon rows, to torch.optim.Muon).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import opcomp


def transformer_shapes(target: float, width: int = 512) -> list[tuple[int, ...]]:
    """The number of transformer blocks (attention and MLP matrices, two norm vectors) nearest ``target``."""
    block = [(3 * width, width), (width, width), (4 * width, width), (width, 4 * width), (width,), (width,)]
    size = sum(torch.Size(s).numel() for s in block)
    return block * max(1, round(target / size))


def parameters(shapes, device, seed: int = 0) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = nn.Parameter(torch.randn(shape, generator=generator).to(device) * 0.02)
        p.grad = torch.randn(shape, generator=generator).to(device) * 1e-3
        params.append(p)
    return params


def contenders(shapes, device) -> dict[str, Callable[[], None]]:
    """name -> one optimizer step; each owns its own copy of the parameters."""
    matrices = [s for s in shapes if len(s) == 2]
    rows: dict[str, torch.optim.Optimizer] = {
        "torch AdamW foreach": torch.optim.AdamW(parameters(shapes, device), lr=1e-3, foreach=True),
        "torch AdamW fused": torch.optim.AdamW(parameters(shapes, device), lr=1e-3, fused=True),
        "opcomp adamw(g)": opcomp.build("adamw(g)", parameters(shapes, device), lr=1e-3),
        "torch Muon (matrices)": torch.optim.Muon(parameters(matrices, device), lr=0.02, weight_decay=0.0),
        "opcomp muon(g) (matrices)": opcomp.build("muon(g)", parameters(matrices, device), lr=0.02),
    }
    return {name: opt.step for name, opt in rows.items()}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(steps: dict[str, Callable[[], None]], rounds: int, device: str) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():  # warm up: state allocation, first-call overheads
        step()
    synchronize(device)
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in samples.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=10e6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    shapes = transformer_shapes(args.params)
    total = sum(torch.Size(s).numel() for s in shapes)
    matrix_total = sum(torch.Size(s).numel() for s in shapes if len(s) == 2)
    times = measure(contenders(shapes, args.device), args.steps, args.device)
    fused = times["torch AdamW fused"]
    muon = times["torch Muon (matrices)"]
    print(
        f"{total / 1e6:.1f}M parameters in {len(shapes)} tensors ({matrix_total / 1e6:.1f}M in matrices), "
        f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {args.steps} steps"
    )
    print("| optimizer | ms / step | × AdamW fused | × torch Muon |")
    print("| --- | --- | --- | --- |")
    for name, ms in times.items():
        versus_muon = f"{ms / muon:.2f}" if "uon" in name else ""
        print(f"| {name} | {ms:.1f} | {ms / fused:.2f} | {versus_muon} |")


if __name__ == "__main__":
    main()
