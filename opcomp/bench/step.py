"""Optimizer step time and memory, side by side in one run, against torch.optim, heavyball and the roofline.

    opcomp bench step [--shapes small|gpt2|resnet18] [--expr adamw(g) muon(g) ...] [--device cpu] [--steps 20]

Every optimizer steps its own copy of parameters shaped like the chosen model, with fixed random
gradients; rows are interleaved round by round so machine noise hits them alike. Each opcomp
expression runs eager and compiled. Muon rows (torch's, heavyball's and opcomp's) take the 2-D
parameters only, since torch.optim.Muon accepts nothing else. The roofline is the least time an
AdamW step can take: 28 bytes per fp32 parameter (read p, g, m, v; write p, m, v) divided by the
copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Mapping

import torch
from torch import nn

import opcomp
from opcomp.comparison.footprint import state_bytes
from opcomp.comparison.runs import check_device
from opcomp.errors import OpcompError

ADAMW_BYTES_PER_PARAMETER = 28


def transformer_shapes(target: float, width: int = 512) -> list[tuple[int, ...]]:
    """The number of transformer blocks (attention and MLP matrices, two norm vectors) nearest ``target``."""
    block = [(3 * width, width), (width, width), (4 * width, width), (width, 4 * width), (width,), (width,)]
    size = sum(torch.Size(s).numel() for s in block)
    return block * max(1, round(target / size))


def gpt2_small() -> list[tuple[int, ...]]:
    """GPT-2 small (124M): token and position embeddings, 12 blocks, final norm."""
    block = [
        (768,),
        (768,),
        (768, 2304),
        (2304,),
        (768, 768),
        (768,),
        (768,),
        (768,),
        (768, 3072),
        (3072,),
        (3072, 768),
        (768,),
    ]
    return [(50257, 768), (1024, 768), *block * 12, (768,), (768,)]


def resnet18() -> list[tuple[int, ...]]:
    """ResNet-18 (11.7M): convolutions, batch norms, the classifier."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    channels = 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            shapes += [(width, channels, 3, 3), (width,), (width,), (width, width, 3, 3), (width,), (width,)]
            if block == 0 and (stride != 1 or channels != width):
                shapes += [(width, channels, 1, 1), (width,), (width,)]
            channels = width
    return [*shapes, (1000, 512), (1000,)]


SHAPES: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "small": lambda: transformer_shapes(10e6),
    "gpt2": gpt2_small,
    "resnet18": resnet18,
}


def parameters(shapes, device, seed: int = 0) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = nn.Parameter(torch.randn(shape, generator=generator).to(device) * 0.02)
        p.grad = torch.randn(shape, generator=generator).to(device) * 1e-3
        params.append(p)
    return params


def contenders(shapes, device: str, expressions: list[str]) -> dict[str, torch.optim.Optimizer]:
    """Row name -> optimizer over its own copy of the parameters."""
    matrices = [s for s in shapes if len(s) == 2]
    rows: dict[str, torch.optim.Optimizer] = {
        "torch AdamW foreach": torch.optim.AdamW(parameters(shapes, device), lr=1e-3, foreach=True),
        "torch AdamW fused": torch.optim.AdamW(parameters(shapes, device), lr=1e-3, fused=True),
        "torch Muon (2-D)": torch.optim.Muon(parameters(matrices, device), lr=0.02, weight_decay=0.0),
    }
    try:
        import heavyball

        rows["heavyball AdamW"] = heavyball.AdamW(parameters(shapes, device), lr=1e-3)
        rows["heavyball Muon (2-D)"] = heavyball.Muon(parameters(matrices, device), lr=0.02)
        rows["heavyball SOAP"] = heavyball.SOAP(parameters(shapes, device), lr=1e-3)
    except ImportError:
        pass  # the table says which rows are missing
    for expression in expressions:
        subset = matrices if "muon" in expression else shapes
        suffix = " (2-D)" if "muon" in expression else ""
        for mode in ("off", "on"):
            label = f"opcomp {expression}{suffix} {'compiled' if mode == 'on' else 'eager'}"
            rows[label] = opcomp.build(expression, parameters(subset, device), lr=1e-3, compile=mode)
    return rows


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(
    runs: Mapping[str, Callable[[], object]], rounds: int, device: str, alternate: bool = False
) -> dict[str, list[float]]:
    """Seconds each run takes, timed in turn round by round so that the machine's drift falls on
    every row alike (with ``alternate``, every other round in reverse order), each between
    synchronisations of the device."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(rounds):
        order = list(runs) if not alternate or round_ % 2 else list(reversed(runs))
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            runs[name]()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return samples


def bandwidth(nbytes: int, device: str, in_place: bool, repeats: int = 10) -> float:
    """Bytes per second of ``b.copy_(a)`` (2 bytes counted per byte copied) or, in place,
    ``b.add_(a)`` (3 counted: a read-modify-write like an optimizer's, no write-allocate)."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    b = torch.empty_like(a).normal_()
    operation = (lambda: b.add_(a)) if in_place else (lambda: b.copy_(a))
    operation()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        operation()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return (3 if in_place else 2) * a.numel() * 4 / statistics.median(samples)


def stepper(opt: torch.optim.Optimizer) -> Callable[[], None]:
    """One step with the fixed gradients attached again first (heavyball consumes them)."""
    grads = [(p, p.grad) for group in opt.param_groups for p in group["params"]]

    def step() -> None:
        for param, grad in grads:
            param.grad = grad
        opt.step()

    return step


def measure(optimizers: dict[str, torch.optim.Optimizer], rounds: int, device: str) -> tuple[dict, dict]:
    """Median step time (ms) and peak memory increase during a step (bytes, CUDA only)."""
    steps = {name: stepper(opt) for name, opt in optimizers.items()}
    for step in steps.values():  # warm up: state allocation, compilation
        step()
        step()
    synchronize(device)
    peaks: dict[str, int | None] = {}
    for name, step in steps.items():
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step()
            synchronize(device)
            peaks[name] = torch.cuda.max_memory_allocated() - before
        else:
            peaks[name] = None
    samples = interleaved(steps, rounds, device)
    return {name: statistics.median(v) * 1e3 for name, v in samples.items()}, peaks


def table(shapes_name: str, device: str, expressions: list[str], rounds: int) -> str:
    shapes = SHAPES[shapes_name]()
    total = sum(torch.Size(s).numel() for s in shapes)
    optimizers = contenders(shapes, device, expressions)
    times, peaks = measure(optimizers, rounds, device)
    size = max(256 << 20, total * 4)
    copy, in_place = bandwidth(size, device, in_place=False), bandwidth(size, device, in_place=True)
    rooflines = {
        "roofline: 28 B/param ÷ copy bandwidth": ADAMW_BYTES_PER_PARAMETER * total / copy * 1e3,
        "roofline: 28 B/param ÷ in-place bandwidth": ADAMW_BYTES_PER_PARAMETER * total / in_place * 1e3,
    }
    fused = times["torch AdamW fused"]
    muon = times["torch Muon (2-D)"]
    lines = [
        f"{shapes_name}: {total / 1e6:.1f}M parameters in {len(shapes)} tensors, device {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {rounds} steps; "
        f"bandwidth: copy {copy / 1e9:.1f} GB/s, in-place add {in_place / 1e9:.1f} GB/s",
        "",
        "| optimizer | ms / step | × AdamW fused | × torch Muon | state MB | peak MB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {name} | {ms:.1f} | {ms / fused:.2f} | | | |" for name, ms in rooflines.items()]
    for name, ms in times.items():
        versus_muon = f"{ms / muon:.2f}" if "Muon" in name or "muon" in name else ""
        peak = f"{peaks[name] / 2**20:.0f}" if peaks[name] is not None else "—"
        state = state_bytes(optimizers[name]) / 2**20
        lines.append(f"| {name} | {ms:.1f} | {ms / fused:.2f} | {versus_muon} | {state:.0f} | {peak} |")
    if not any(name.startswith("heavyball") for name in times):
        lines.append("")
        lines.append("heavyball is not installed (pip install 'opcomp[bench]'): its rows are missing.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="opcomp bench step", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=list(SHAPES), default="small")
    parser.add_argument("--expr", nargs="+", default=["adamw(g)", "muon(g)"], help="opcomp expressions to time")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise OpcompError(f"--steps must be at least 1, got {args.steps}")
    print(table(args.shapes, str(check_device(args.device)), args.expr, args.steps))


if __name__ == "__main__":
    main()
