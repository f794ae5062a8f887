"""What layer statistics cost: hooks, factor updates and inversions, beside a plain Muon step.

    python -m opcomp.bench.kfac [--model mlp|transformer|resnet|cnn] [--steps 30] [--device cuda] [--vocabulary 96]
                                [--without-muon]

Each row is a full training step (forward, backward, opt.step) on the same model and batch, rows
interleaved round by round, every other round in reverse order (so no row always follows the same
one); medians in milliseconds (a step that refreshes inverses is rarer than one in two, so the
median is the step between refreshes), and the ratio of means, which spreads the refreshes over the
steps. Two more rows bound fog from below: its matrix products alone (each layer's factor grams, one
per input read alike, and its two preconditioning products, on random rows of the shapes a step
captures), and a muon_adamw step followed by them, timed as one row: what fog costs in fp32 with
nothing else. Another does so for fog_amortized, its grams on one step in ten
(:data:`AMORTIZED_UPDATES`) and its preconditioning on every one. One more does the same for
ekfac_sgd: a momentum(g) step, then EKFAC's products (:mod:`opcomp.bench.floors`). Then parts of
fog's step alone: the capture hooks (forward + backward, armed against disarmed), one batched
refresh of every factor inverse, and ``opt.step`` deciding its checks on the host against keeping
them on the device, as it does on CUDA (forced here on whatever device runs). ``--without-muon``
times the same statistics with Muon's orthogonalisation left out, against an adamw step
(:data:`WITHOUT_MUON`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace
from unittest.mock import patch

import torch
from torch import nn
from torch.nn import functional as F

import opcomp
import opcomp.step.transactional as transactional
from opcomp.bench.floors import ekfac_products, fog_products, layer_shapes
from opcomp.bench.step import interleaved, synchronize
from opcomp.comparison import models
from opcomp.comparison.report import table_cell
from opcomp.kernels.kfac import invert_factored
from opcomp.layers.shapes import FactorForm

CONFIGURATIONS = {
    "muon(g) | adamw": "muon_adamw",
    "fog, invert_every=1": "muon[hidden](kfac[invert_every=1](g)) | 0.1 * adamw",
    "fog, invert_every=10": "fog",
    "fog[bf16]": "fog[bf16]",
    "fog, invert_every=100": "muon[hidden](kfac[invert_every=100](g)) | 0.1 * adamw",
    "fog, update_every=10, invert_every=10": "muon[hidden](kfac[update_every=10](g)) | 0.1 * adamw",
    "fog, exact damping, invert_every=10": "muon[hidden](kfac[damping_mode=exact](g)) | 0.1 * adamw",
    "muon(ekfac) | adamw, invert_every=10": "muon[hidden](ekfac(g)) | 0.1 * adamw",
    "fog_amortized (update_every=10, invert_every=100)": "fog_amortized",
    "fog_amortized[bf16]": "fog_amortized[bf16]",
    "diagfog": "diagfog",
    "momentum(g)": "momentum(g)",
    "ekfac_sgd": "ekfac_sgd",
}


WITHOUT_MUON = {
    "adamw": "adamw",
    "kfac(g) | adamw": "kfac(g) | adamw",
    "kfac[update_every=10, invert_every=100](g) | adamw": "kfac[update_every=10, invert_every=100](g) | adamw",
    "diag_kfac(g) | adamw": "diag_kfac(g) | adamw",
    "momentum(g)": "momentum(g)",
    "ekfac_sgd": "ekfac_sgd",
}
"""The presets' statistics without Muon (``--without-muon``): on a CPU whose bfloat16 products are
slow, Muon's iteration is most of every Muon step and hides what the statistics cost."""


def without_subnormals() -> None:
    """Rows train one fixed batch for dozens of steps at lr 0.01, and some fit it: ekfac_sgd's loss
    on the MLP fell to 1e-9, its gradients' squares to subnormal floats, and its step from 49 to 86
    ms (188 ms in a run of this bench) in the CPU's slow path for them. Training on data keeps the
    loss away from zero, so the bench flushes subnormals to zero."""
    torch.set_flush_denormal(True)


AMORTIZED_UPDATES = 10
"""fog_amortized's update_every: its grams come on one step in ten, its preconditioning on every one."""


def floor_labels(baseline: str) -> tuple[str, str, str]:
    """The rows of fog's products alone, of fog's floor and of fog_amortized's floor."""
    return (
        "fog's matrix products alone",
        f"{baseline}, then fog's matrix products (fog's floor in fp32)",
        f"{baseline}, then fog_amortized's matrix products (its floor in fp32: grams one step in ten)",
    )


EKFAC_FLOOR = "momentum(g), then ekfac's matrix products (ekfac_sgd's floor in fp32)"


def task(kind: str, seed: int = 0, device: str = "cpu", vocabulary: int = 96):
    """A model factory and one fixed batch with its loss, on ``device``: the MLP on 256 examples,
    the small ResNet (strided and 1×1 convolutions, batch norm) or the plain CNN (:func:`plain_cnn`)
    on 64 images of 32×32, the transformer on 16 sequences, whose ``vocabulary`` sizes its
    embedding and head (fog steps them with AdamW)."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        x = torch.randn(256, 784, generator=generator).to(device)
        y = torch.randint(0, 10, (256,), generator=generator).to(device)
        return (lambda: models.mlp(784, 512, 10).to(device)), (lambda m: F.cross_entropy(m(x), y))
    if kind in ("resnet", "cnn"):
        images = torch.randn(64, 3, 32, 32, generator=generator).to(device)
        labels = torch.randint(0, 10, (64,), generator=generator).to(device)
        model = models.small_resnet if kind == "resnet" else plain_cnn
        return (lambda: model().to(device)), (lambda m: F.cross_entropy(m(images), labels))
    tokens = torch.randint(0, vocabulary, (16, 64), generator=generator).to(device)

    def loss(model: nn.Module) -> torch.Tensor:
        return F.cross_entropy(model(tokens[:, :-1]).reshape(-1, vocabulary), tokens[:, 1:].reshape(-1))

    return (lambda: models.CharTransformer(vocabulary, width=128, heads=4, depth=2, length=64).to(device)), loss


def plain_cnn() -> nn.Module:
    """Three 3×3 convolutions 3 → 32 → 64 → 64 (the last two strided) on 32×32 images, global
    average pooling and a linear classifier: a plain CNN beside the ResNet (no batch norm, no shortcut)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def training_step(model: nn.Module, opt: torch.optim.Optimizer, loss) -> None:
    opt.zero_grad()
    loss(model).backward()
    opt.step()


def form(factor: torch.Tensor) -> FactorForm:
    """How a factor is kept, read from its shape (these models' factors are whole or diagonal)."""
    side = factor.shape[-1]
    return FactorForm.diagonal_of(side) if factor.ndim == 1 else FactorForm(side)


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["mlp", "transformer", "resnet", "cnn"], default="mlp")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocabulary", type=int, default=96, help="the transformer's tokens")
    parser.add_argument("--without-muon", action="store_true", help="time the statistics alone (WITHOUT_MUON)")
    args = parser.parse_args(argv)
    without_subnormals()
    make, loss = task(args.model, device=args.device, vocabulary=args.vocabulary)
    configurations, base, fog = (
        (WITHOUT_MUON, "adamw", "kfac(g) | adamw")
        if args.without_muon
        else (CONFIGURATIONS, "muon(g) | adamw", "fog, invert_every=10")
    )
    runs = {}
    for label, expression in configurations.items():
        torch.manual_seed(0)
        model = make()
        runs[label] = (model, opcomp.build(expression, model, lr=0.01))
    for model, opt in runs.values():  # warm up: state, first factors and inverses
        training_step(model, opt, loss)
    shapes = layer_shapes(*runs[fog], loss, "kfac[")
    products, amortized = fog_products(shapes), fog_products(shapes, grams_every=AMORTIZED_UPDATES)
    ekfac = ekfac_products(layer_shapes(*runs["ekfac_sgd"], loss, "ekfac["))
    baseline_run, momentum_run = runs[base], runs["momentum(g)"]
    rows = {
        label: (lambda model=model, opt=opt: training_step(model, opt, loss)) for label, (model, opt) in runs.items()
    }
    alone, floor, amortized_floor = floor_labels(base)
    rows[alone] = products
    rows[floor] = lambda: (training_step(*baseline_run, loss), products())
    rows[amortized_floor] = lambda: (training_step(*baseline_run, loss), amortized())
    rows[EKFAC_FLOOR] = lambda: (training_step(*momentum_run, loss), ekfac())
    samples = interleaved(rows, args.steps, args.device, alternate=True)
    count = sum(p.numel() for p in next(iter(runs.values()))[0].parameters())
    print(
        f"model {args.model} ({count / 1e6:.2f}M parameters), median of {args.steps} steps, "
        f"{torch.get_num_threads()} threads, device {args.device}"
    )
    baseline = median_ms(samples[base])
    mean_baseline = statistics.mean(samples[base])
    print(f"| optimizer | ms / training step (median) | × {table_cell(base)} | mean, refreshes included: × |")
    print("| --- | --- | --- | --- |")
    for label, values in samples.items():
        ratio, mean_ratio = median_ms(values) / baseline, statistics.mean(values) / mean_baseline
        print(f"| {table_cell(label)} | {median_ms(values):.1f} | {ratio:.2f} | {mean_ratio:.2f} |")

    model, opt = runs[fog]
    armed, disarmed = [], []
    for _ in range(args.steps):
        for flag, bucket in ((True, armed), (False, disarmed)):
            opt._capture.armed = flag
            opt.zero_grad()
            synchronize(args.device)
            start = time.perf_counter()
            loss(model).backward()
            synchronize(args.device)
            bucket.append(time.perf_counter() - start)
            opt._capture.clear()
    layers = [
        entry
        for param, state in opt.state.items()
        for key, entry in state.items()
        if key.startswith("kfac[") and "A_inv" in entry
    ]
    slots = [SimpleNamespace(state=entry, forms=(form(entry["A"]), form(entry["G"]))) for entry in layers]
    inversions = []
    for _ in range(args.steps):
        synchronize(args.device)
        start = time.perf_counter()
        invert_factored(slots, 1e-3)
        synchronize(args.device)
        inversions.append(time.perf_counter() - start)
    opt._arm()  # the hooks' timing above left the capture disarmed
    decided: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.steps):
        for on_device, bucket in decided.items():
            with patch.object(transactional, "decides_on_device", lambda params, answer=on_device: answer):
                opt.zero_grad()
                loss(model).backward()
                synchronize(args.device)
                start = time.perf_counter()
                opt.step()
                synchronize(args.device)
                bucket.append(time.perf_counter() - start)
    print()
    print("| part of fog's step | ms |")
    print("| --- | --- |")
    print(f"| forward + backward, hooks disarmed | {median_ms(disarmed):.1f} |")
    print(f"| forward + backward, hooks recording | {median_ms(armed):.1f} |")
    print(f"| refresh of all {len(slots)} layers' factor inverses (batched by size) | {median_ms(inversions):.1f} |")
    print(f"| opt.step, its checks read by the host | {median_ms(decided[False]):.1f} |")
    print(f"| opt.step, its checks kept on the device (masked writes; CUDA's way) | {median_ms(decided[True]):.1f} |")


if __name__ == "__main__":
    main()
