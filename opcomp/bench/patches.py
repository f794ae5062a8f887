"""What a Conv2d's KFAC rows cost: its patches averaged over positions, unfolded or not.

    python -m opcomp.bench.patches [--repeats 20] [--device cpu]

For the convolutions of the small ResNet and the plain CNN on 64 images of 32×32 (``bench.kfac
--model resnet``, ``--model cnn``) and of ResNet-18 on 32 images of 224×224:
``F.unfold(x).mean(2)`` (what the statistics did first), a convolution of each channel with a
kernel of ones the output's size, two thin products with the 0/1 tap selectors (R_hᵀ (X R_w)), and
:func:`~opcomp.layers.samples.patch_means` in both its forms (one product with the selectors'
Kronecker product, or sums over the strides' phases) and as it chooses between them, medians in
milliseconds, rows interleaved, with the largest difference from the unfolded means.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

from opcomp.bench.step import synchronize
from opcomp.layers.samples import patch_means, selectors, tap_sums_by_phases, tap_sums_in_one

# (images, channels, side, kernel, stride, padding): the small ResNet's and the plain CNN's every distinct conv
# (bench.kfac), ResNet-18's some
SHAPES = {
    "small ResNet, 64 × 32²": [
        (64, 3, 32, 7, 2, 3),
        (64, 32, 8, 3, 1, 1),
        (64, 32, 8, 3, 2, 1),
        (64, 32, 8, 1, 2, 0),
        (64, 64, 4, 3, 1, 1),
        (64, 64, 4, 3, 2, 1),
        (64, 64, 4, 1, 2, 0),
        (64, 128, 2, 3, 1, 1),
    ],
    "plain CNN, 64 × 32²": [
        (64, 3, 32, 3, 1, 1),
        (64, 32, 32, 3, 2, 1),
        (64, 64, 16, 3, 2, 1),
    ],
    "ResNet-18, 32 × 224²": [
        (32, 3, 224, 7, 2, 3),
        (32, 64, 56, 3, 1, 1),
        (32, 64, 56, 3, 2, 1),
        (32, 128, 28, 3, 1, 1),
        (32, 256, 14, 3, 1, 1),
        (32, 512, 7, 3, 1, 1),
    ],
}


def unfolded(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    return F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride).mean(2)


def ones_kernel(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Each channel convolved with ones the output's size, strided by the dilation, dilated by the stride."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    out_h, out_w = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    ones = x.new_ones(1, 1, out_h, out_w)
    sums = F.conv2d(x.reshape(n * c, 1, h, w), ones, stride=(dh, dw), dilation=(sh, sw), padding=(ph, pw))
    return sums[:, 0, :kh, :kw].reshape(n, -1) / (out_h * out_w)


def two_products(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """R_hᵀ (X R_w): the selectors' two thin products, reading the input as kw-wide rows."""
    rows, columns, positions = selectors(x, conv)
    return (rows.T @ (x @ columns)).reshape(len(x), -1) / positions


def one_product(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    return tap_sums_in_one(x, conv) / selectors(x, conv)[2]


def by_phases(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    return tap_sums_by_phases(x, conv) / selectors(x, conv)[2]


def median_ms(run, repeats: int, device: str) -> float:
    samples = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    ways = {
        "unfold, mean": unfolded,
        "ones kernel": ones_kernel,
        "two products": two_products,
        "one product": one_product,
        "phases": by_phases,
        "patch_means": patch_means,
    }
    print(f"{torch.get_num_threads()} threads, device {args.device}, median of {args.repeats}")
    print()
    print(
        "| model | images, channels, side, kernel/stride/padding | unfold + mean ms | ones kernel ms | "
        "two products ms | one product ms | phases ms | patch_means ms | unfold ÷ patch_means | largest difference |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for model, shapes in SHAPES.items():
        for images, channels, side, kernel, stride, padding in shapes:
            conv = nn.Conv2d(channels, 8, kernel, stride=stride, padding=padding).to(args.device)
            x = torch.randn(images, channels, side, side, device=args.device)
            times = {name: [] for name in ways}
            half = args.repeats // 2 or 1
            for _ in range(2):  # interleaved halves: the machine's drift falls on every way alike
                for name, way in ways.items():
                    times[name].append(median_ms(lambda way=way, x=x, conv=conv: way(x, conv), half, args.device))
            ms = {name: statistics.mean(values) for name, values in times.items()}
            difference = (patch_means(x, conv) - unfolded(x, conv)).abs().max().item()
            print(
                f"| {model} | {images}, {channels}, {side}, {kernel}/{stride}/{padding} | {ms['unfold, mean']:.2f} | "
                f"{ms['ones kernel']:.2f} | {ms['two products']:.2f} | {ms['one product']:.2f} | {ms['phases']:.2f} | "
                f"{ms['patch_means']:.2f} | "
                f"{ms['unfold, mean'] / ms['patch_means']:.1f} | {difference:.1e} |"
            )


if __name__ == "__main__":
    main()
