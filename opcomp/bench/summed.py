"""What summing a conv's records as its gradient arrives saves: memory held to the step, and time.

    python -m opcomp.bench.summed [--model cnn|resnet] [--steps 40] [--device cpu]

For each preset (fog, diagfog by default): two optimizers on two copies of one model, one whose
capture sums its convs' records in the gradient hook (opcomp's way, :mod:`opcomp.layers.summed`)
and one told to hold every input and output gradient until ``opt.step`` (``Capture.summed``
emptied, as before), with a muon_adamw step beside them; full training steps in turn, every other
round in reverse order, medians in milliseconds and their ratio to muon_adamw's. Then the bytes
fog's records hold between the backward and the step, both ways, on the plain CNN, the small
ResNet and ResNet-18 on 32 images of 224² (storages counted per record).
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch
from torch.nn import functional as F

import opcomp
from opcomp.bench.kfac import plain_cnn, task, training_step, without_subnormals
from opcomp.bench.step import interleaved
from opcomp.comparison import models

MEMORY_MODELS = {
    "plain CNN, 64 images of 32²": (plain_cnn, (64, 3, 32, 32)),
    "small ResNet, 64 images of 32²": (models.small_resnet, (64, 3, 32, 32)),
    "ResNet-18, 32 images of 224²": (models.resnet18, (32, 3, 224, 224)),
}


def built(expression: str, model, summed: bool):
    opt = opcomp.build(expression, model)
    if not summed and opt._capture is not None:
        opt._capture.summed = {}
    return opt


def held_bytes(opt) -> int:
    """Bytes of the storages the capture's records hold now (each record's own, shared ones again)."""
    total = 0
    for entries in opt._capture.entries.values():
        for entry in entries:
            summed = [entry.summed.means, entry.summed.sums] if entry.summed is not None else []
            total += sum(t.untyped_storage().nbytes() for t in [entry.input, entry.grad, *summed] if t is not None)
    return total


def memory_rows(expression: str = "fog") -> list[str]:
    rows = []
    for label, (make, shape) in MEMORY_MODELS.items():
        sizes = []
        for summed in (False, True):
            torch.manual_seed(0)
            model = make()
            opt = built(expression, model, summed)
            images = torch.randn(shape)
            F.cross_entropy(model(images), torch.randint(0, 10, (shape[0],))).backward()
            sizes.append(held_bytes(opt) / 2**20)
            opt.close()
        rows.append(f"| {label} | {sizes[0]:.1f} | {sizes[1]:.2f} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=["fog", "diagfog"])
    parser.add_argument("--model", choices=["cnn", "resnet"], default="cnn")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", opcomp.OpcompWarning)
    without_subnormals()  # as bench.kfac does
    make, loss = task(args.model, device=args.device)
    runs = {}
    for preset in args.presets:
        for summed in (False, True):
            torch.manual_seed(0)
            model = make()
            opt = built(preset, model, summed)
            runs[f"{preset}, {'summed in the hook' if summed else 'held to the step'}"] = (model, opt)
    torch.manual_seed(0)
    baseline = make()
    runs["muon_adamw"] = (baseline, opcomp.build("muon_adamw", baseline))
    steps = {name: (lambda m=m, o=o: training_step(m, o, loss)) for name, (m, o) in runs.items()}
    interleaved(steps, 3, args.device)  # warm up
    samples = interleaved(steps, args.steps, args.device, alternate=True)
    base = statistics.median(samples["muon_adamw"])
    print(f"model {args.model}, median of {args.steps} steps, {torch.get_num_threads()} threads, device {args.device}")
    print("| optimizer | ms / training step | × muon_adamw |")
    print("| --- | --- | --- |")
    for name, times in samples.items():
        print(f"| {name} | {statistics.median(times) * 1e3:.1f} | {statistics.median(times) / base:.2f} |")
    print()
    print("MiB fog's records hold between the backward and the step")
    print("| model | held to the step | summed in the hook |")
    print("| --- | --- | --- |")
    print("\n".join(memory_rows()))


if __name__ == "__main__":
    main()
