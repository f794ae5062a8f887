"""What data-parallel training costs opcomp: bytes it all-reduces and step time, 1 process vs 2.

    python -m opcomp.bench.ddp [--presets muon_adamw fog] [--steps 10] [--rounds 2]

Each preset trains the MLP (784-512-10, batch 256) and the character transformer (width 128,
2 blocks, 16 × 64 tokens) with the closure protocol: one process on the whole batch with 2
threads, and 2 DDP ranks (gloo on 127.0.0.1) on half batches with 1 thread each, rounds
alternating. Reported: the median step time, the bytes opcomp all-reduced per step (with the
closure protocol opcomp runs the backward, so the gradients, 4 bytes per parameter, are among them
and DDP's own hooks never fire), and the balance of the owner split of KFAC's decompositions (Σ d³
on the busiest rank over the mean; 1.00 is perfect).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import opcomp
from opcomp.bench import ranks
from opcomp.comparison import models

BATCH = {"mlp": 256, "transformer": 16}


def model_and_batch(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    if kind == "mlp":
        x = torch.randn(BATCH[kind], 784, generator=generator)
        return models.mlp(784, 512, 10), x, torch.randint(0, 10, (BATCH[kind],), generator=generator)
    tokens = torch.randint(0, 96, (BATCH[kind], 65), generator=generator)
    return models.CharTransformer(96, width=128, heads=4, depth=2, length=64), tokens[:, :-1], tokens[:, 1:]


def measure(preset: str, kind: str, steps: int, rank: int, world: int) -> dict:
    """Median step time (ms), opcomp's bytes per step and its split's balance, on this rank."""
    model, x, y = model_and_batch(kind)
    share = len(x) // world
    x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
    wrapped = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = opcomp.build(preset, wrapped)

    def closure():
        return F.cross_entropy(_logits(wrapped, x), y.reshape(-1))

    times, balance = [], None
    for step in range(steps + 2):  # two warm-up steps: the first inverts every factor
        if step == 2 and opt.data_parallel is not None:
            tally = opt.data_parallel.tally
            balance = tally["most work"] / tally["mean work"] if tally["mean work"] else None
            tally.clear()
        start = time.perf_counter()
        opt.step(closure)
        times.append(time.perf_counter() - start)
    sent = opt.data_parallel.tally["bytes"] / steps if opt.data_parallel is not None else 0
    return {"ms": statistics.median(times[2:]) * 1e3, "bytes": sent, "balance": balance}


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.reshape(-1, out.shape[-1])


def rank_main(rank: int, world: int, port: int, out_dir: Path) -> None:
    plan = json.loads((out_dir / "plan.json").read_text())
    with ranks.joined(rank, world, port):
        results = {f"{p}|{k}": measure(p, k, plan["steps"], rank, world) for p in plan["presets"] for k in BATCH}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["muon_adamw", "fog"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    rows: dict[str, dict[int, list[dict]]] = {}
    with tempfile.TemporaryDirectory() as directory:
        out_dir = Path(directory)
        (out_dir / "plan.json").write_text(json.dumps({"presets": args.presets, "steps": args.steps}))
        for _ in range(args.rounds):
            for world, threads in ((1, 2), (2, 1)):
                ranks.launch(["-m", "opcomp.bench.ddp", "--rank"], out_dir, world, timeout=600, threads=threads)
                for key, result in json.loads((out_dir / "rank0.json").read_text()).items():
                    rows.setdefault(key, {}).setdefault(world, []).append(result)
    print("| preset | model | 1 process ms | 2 ranks ms | ratio | opcomp all-reduce per step | owner balance |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for key, by_world in rows.items():
        preset, kind = key.split("|")
        one = statistics.median(r["ms"] for r in by_world[1])
        two = statistics.median(r["ms"] for r in by_world[2])
        sent = by_world[2][0]["bytes"]
        balance = by_world[2][0]["balance"]
        print(
            f"| {preset} | {kind} | {one:.1f} | {two:.1f} | {two / one:.2f} | {sent / 1024:.1f} KiB | "
            f"{'—' if balance is None else f'{balance:.2f}'} |"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank":
        rank_main(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
    else:
        main()
