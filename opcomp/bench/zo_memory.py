"""Peak memory of a zeroth-order step beside a forward pass alone and a backprop step.

    python -m opcomp.bench.zo_memory [--width 2048] [--depth 4] [--batch 256] [--device cpu]

MeZO's point is inference-level memory: two forward passes without a graph, no gradients. Each row
runs in a fresh process; on the CPU the figure is the growth of the peak resident set over the
process's size once model, data and optimizer exist, on CUDA ``torch.cuda.max_memory_allocated``
over the allocated size at that point (glibc is told to return freed blocks at once, so the resident
peak follows live tensors). Figures are MiB and multiples of the parameters' bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch
from torch import nn

VARIANTS = {
    "forward (no_grad)": None,
    "mezo": "mezo",
    "awzo": "awzo",
    "sgd (backprop)": "sgd",
    "adamw (backprop)": "adamw",
}


ALLOCATOR = {
    **os.environ,
    # glibc serves large blocks by mmap and returns them when freed, so the resident peak counts live
    # tensors, not blocks the allocator keeps after a free (its dynamic threshold would)
    "MALLOC_MMAP_THRESHOLD_": str(1 << 17),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 17),
}


def model_and_data(width: int, depth: int, batch: int, device: str):
    torch.manual_seed(0)
    layers = [nn.Linear(width, width) for _ in range(depth)]
    model = nn.Sequential(*(m for layer in layers for m in (layer, nn.ReLU())), nn.Linear(width, 10)).to(device)
    x = torch.randn(batch, width, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    return model, x, y


def resident_mib() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(variant: str, width: int, depth: int, batch: int, device: str) -> dict:
    """In this process: the peak growth of one variant's two steps (the first creates any state)."""
    import opcomp

    model, x, y = model_and_data(width, depth, batch, device)
    expression = VARIANTS[variant]
    opt = opcomp.build(expression, model, lr=1e-4, compile="off") if expression else None

    def closure():
        return nn.functional.cross_entropy(model(x), y)

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = resident_mib()
    for _ in range(2):
        if opt is None:
            with torch.no_grad():
                closure()
        else:
            opt.step(closure)
    if cuda:
        torch.cuda.synchronize()
        grown = torch.cuda.max_memory_allocated() / 2**20 - before
    else:
        grown = peak_mib() - before
    parameters = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return {"variant": variant, "peak_mib": max(grown, 0.0), "parameter_mib": parameters}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.width, args.depth, args.batch, args.device)))
        return
    rows = []
    for variant in VARIANTS:
        command = [sys.executable, "-m", "opcomp.bench.zo_memory", "--one", variant]
        command += ["--width", str(args.width), "--depth", str(args.depth), "--batch", str(args.batch)]
        command += ["--device", args.device]
        run = subprocess.run(command, capture_output=True, text=True, check=True, env=ALLOCATOR)
        rows.append(json.loads(run.stdout))
    parameters = rows[0]["parameter_mib"]
    print(f"MLP {args.depth}×{args.width}, batch {args.batch}, {args.device}: parameters {parameters:.1f} MiB")
    print("| step | peak above the built model, MiB | × parameter bytes |")
    print("| --- | --- | --- |")
    for row in rows:
        print(f"| {row['variant']} | {row['peak_mib']:.1f} | {row['peak_mib'] / parameters:.2f} |")


if __name__ == "__main__":
    main()
