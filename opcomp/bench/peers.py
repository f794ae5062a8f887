"""One training step of the preconditioners researchers compare against, opcomp's beside the libraries'.

    python -m opcomp.bench.peers [--model mlp resnet transformer] [--rounds 7] [--device cpu] [--skip NAME ...]

Each row is a full training step (forward, backward, ``opt.step``) of its own copy of the same
model on the same fixed batch (``opcomp.bench.kfac``'s tasks: the 784-512-512-10 MLP on 256
examples, the small ResNet on 64 images of 32×32, the character transformer on 16 sequences).
Rows are interleaved round by round; each row first takes two untimed steps (state made, a
compiled kernel compiled: heavyball compiles its own). Medians in milliseconds and the ratio to
fused AdamW's step and to opcomp's muon_adamw step in the same run. Settings are each library's
defaults, except where a row names them: opcomp's ``shampoo`` roots every step, as
pytorch_optimizer's Shampoo does by default. torch's Muon takes the 2-D weights only (it refuses
anything else); the rest of that model does not step.
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from collections.abc import Callable

import torch
from torch import nn

import opcomp
from opcomp.bench.kfac import task, training_step
from opcomp.bench.step import interleaved

OPCOMP = ("soap", "shampoo", "adafactor", "ds_shampoo", "muon_soap", "fog", "muon_adamw")


def peers(model: nn.Module) -> dict[str, Callable[[], torch.optim.Optimizer]]:
    """Row name -> a function building that library's optimizer over ``model`` at its defaults."""
    import heavyball
    import pytorch_optimizer as po

    params = model.parameters
    return {
        "torch AdamW fused": lambda: torch.optim.AdamW(params(), lr=1e-3, fused=True),
        "torch Muon (2-D only)": lambda: torch.optim.Muon([p for p in params() if p.ndim == 2], lr=0.02),
        "heavyball SOAP": lambda: heavyball.SOAP(params(), lr=3e-3),
        "heavyball PSGDKron": lambda: heavyball.PSGDKron(params(), lr=1e-3),
        "pytorch_optimizer SOAP": lambda: po.SOAP(params(), lr=3e-3),
        "pytorch_optimizer Shampoo": lambda: po.Shampoo(params(), lr=1e-3),
        "pytorch_optimizer Kron": lambda: po.Kron(params(), lr=1e-3),
        "pytorch_optimizer AdaFactor": lambda: po.AdaFactor(params(), lr=1e-3),
    }


def rows(kind: str, device: str, skip: set[str], failed: dict[str, str]) -> dict[str, Callable[[], None]]:
    """Row name -> one training step of that row's optimizer on its own copy of the model; a row
    whose first steps raise goes into ``failed`` with its error instead."""
    make, loss = task(kind, device=device)
    built: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    for name in OPCOMP:
        if f"opcomp {name}" not in skip:
            model = make()
            built[f"opcomp {name}"] = (model, opcomp.build(name, model))
    factories = {}
    for name in peers(nn.Linear(1, 1)):
        if name not in skip:
            model = make()
            factories[name] = (model, peers(model)[name])
    for name, (model, factory) in factories.items():
        built[name] = (model, factory())
    steps = {name: (lambda m=model, o=opt: training_step(m, o, loss)) for name, (model, opt) in built.items()}
    for name, step in list(steps.items()):  # state made, kernels compiled
        try:
            step()
            step()
        except Exception as error:  # a library that cannot step this model: its row says so
            first = str(error).strip().splitlines()[0][:120] if str(error).strip() else ""
            failed[name] = f"{type(error).__name__}: {first}"
            del steps[name]
    return steps


def table(kind: str, device: str, rounds: int, skip: set[str]) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        failed: dict[str, str] = {}
        samples = interleaved(rows(kind, device, skip, failed), rounds, device, alternate=True)
    medians = {name: statistics.median(times) * 1e3 for name, times in samples.items()}
    adamw, muon = medians.get("torch AdamW fused"), medians.get("opcomp muon_adamw")
    lines = [f"**{kind}** ({device}, median of {rounds} interleaved rounds)", ""]
    lines += ["| optimizer | step ms | × fused AdamW | × opcomp muon_adamw |", "| --- | --- | --- | --- |"]
    for name, value in sorted(medians.items(), key=lambda item: item[1]):
        versus_adamw = f"{value / adamw:.2f}" if adamw else "—"
        versus_muon = f"{value / muon:.2f}" if muon else "—"
        lines.append(f"| {name} | {value:.1f} | {versus_adamw} | {versus_muon} |")
    lines += [f"| {name} | failed: {error} | — | — |" for name, error in failed.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["mlp", "resnet", "transformer"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip", nargs="*", default=[], help="row names to leave out")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for kind in args.model:
        print()
        print(table(kind, args.device, args.rounds, set(args.skip)), flush=True)


if __name__ == "__main__":
    main()
