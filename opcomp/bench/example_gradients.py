"""What EKFAC's per-example conv gradients cost: unfolded patches against the weight-gradient kernel.

    python -m opcomp.bench.example_gradients [--repeats 10] [--device cpu]

EKFAC's correction sums each example's gradient ∇W_n = Σ_s d_ns a_nsᵀ over positions before
rotating it when a conv has fewer output channels than positions. Two ways to form them, for
such convolutions of the plain CNN and the small ResNet (64 images of 32², ``bench.kfac``) and of
ResNet-18 (32 of 224²): a few examples' patches unfolded and multiplied by their gradients (what
the correction did first), and :meth:`~opcomp.layers.samples.ConvSample.example_gradients`, the
conv's own weight-gradient kernel with the examples as groups. Medians in milliseconds, the two
interleaved, with the largest difference between them.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from opcomp.bench.patches import median_ms
from opcomp.layers.samples import ConvSample
from opcomp.layers.statistics import CHUNK

# (images, channels, side, outputs, kernel, stride, padding), fewer outputs than positions
SHAPES = {
    "plain CNN": [(64, 3, 32, 32, 3, 1, 1), (64, 32, 32, 64, 3, 2, 1)],
    "small ResNet": [(64, 3, 32, 32, 7, 2, 3), (64, 32, 8, 32, 3, 1, 1)],
    "ResNet-18": [(32, 3, 224, 64, 7, 2, 3), (32, 64, 56, 64, 3, 1, 1), (32, 64, 56, 128, 3, 2, 1)],
}


def unfolded(sample: ConvSample, d: torch.Tensor) -> list[torch.Tensor]:
    """d_nᵀ a_n with the patches of a few examples unfolded at a time (CHUNK values of patches)."""
    chunk = max(1, CHUNK // max(1, d.shape[1] * sample.width))
    starts = range(0, len(d), chunk)
    return [d[start : start + chunk].mT @ sample.patches(start, start + chunk) for start in starts]


def grouped(sample: ConvSample, d: torch.Tensor) -> list[torch.Tensor]:
    """The same, from the weight-gradient kernel, CHUNK values of gradients at a time (as EKFAC does)."""
    columns = sample.grad.flatten(2)  # (N, out, S), as the conv laid them out and EKFAC rotates them
    chunk = max(1, CHUNK // max(1, d.shape[2] * sample.width))
    starts = range(0, len(d), chunk)
    return [sample.example_gradients(columns[start : start + chunk], start, start + chunk) for start in starts]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    print(f"{torch.get_num_threads()} threads, device {args.device}, median of {args.repeats}")
    print()
    print(
        "| model | images, channels, side, outputs, kernel/stride/padding | unfolded ms | grouped kernel ms | "
        "ratio | largest difference |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for model, shapes in SHAPES.items():
        for images, channels, side, outputs, kernel, stride, padding in shapes:
            conv = nn.Conv2d(channels, outputs, kernel, stride=stride, padding=padding, bias=False).to(args.device)
            x = torch.randn(images, channels, side, side, device=args.device)
            grad = torch.randn_like(conv(x))
            sample = ConvSample(conv, x, grad, "weight", x.dtype)
            d = sample.d
            times = {unfolded: [], grouped: []}
            half = args.repeats // 2 or 1
            for _ in range(2):  # interleaved halves: the machine's drift falls on both alike
                for way, bucket in times.items():
                    bucket.append(median_ms(lambda way=way, sample=sample, d=d: way(sample, d), half, args.device))
            old, new = (statistics.mean(values) for values in times.values())
            difference = (torch.cat(unfolded(sample, d)) - torch.cat(grouped(sample, d))).abs().max().item()
            print(
                f"| {model} | {images}, {channels}, {side}, {outputs}, {kernel}/{stride}/{padding} | {old:.2f} | "
                f"{new:.2f} | {new / old:.2f} | {difference:.1e} |"
            )


if __name__ == "__main__":
    main()
