"""Training runs that must come out the same under DDP on 2 ranks (half batches) and in one process
(the whole batch). Run as a script on each rank by :func:`launch`; imported by the tests for the one-
process reference.

    python tests/ddp_cases.py RANK WORLD PORT OUT_DIR
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import opcomp
from opcomp.bench import ranks
from opcomp.kernels import matrix

STEPS = 3
BATCH = 64  # every factor full rank: EKFAC's basis within a null space is arbitrary
PRESETS = [
    "adamw",
    "muon_adamw",
    "fog",
    "diagfog",
    "kfac_sgd",
    "ekfac_sgd",
    "f3eo",
    "sam_sgd",
    "fs_adarmsuon",
    "adagnoema",
    "mezo",
]
SPARSE_UPDATES = "muon[hidden](ekfac[update_every=2, invert_every=2](g)) | 0.1 * adamw(g)"
"""Steps without statistics or refresh, between steps with them."""
GRADIENT_STATISTICS = (
    "graft(shampoo[update_every=2, max_dim=5], adam) + soap[precondition_frequency=2] + adafactor[b1=0.9]"
)
"""The gradient-statistics family in one expression (each rank computes them from the averaged gradient)."""
BLOCKS = "muon[hidden](ekfac[block=4](g)) + kfac[block=3, damping_mode=exact](g) | 0.1 * adamw(g)"
"""Block-KFAC: factors in blocks (last ones padded), their decompositions split by owner across ranks."""
LOOPS = {"closure": "opt.step(closure), opcomp's own backward", "backward": "loss.backward(); opt.step()"}


class Tokens(nn.Module):
    """Embedding, a Linear over every position, a head on the mean: the sequence layer shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))).mean(1))


def conv_net() -> nn.Module:
    """A strided conv, then two Linears."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(36, 12), nn.Tanh(), nn.Linear(12, 3)
    )


MODELS = {"conv": (conv_net, lambda g: torch.randn(BATCH, 1, 8, 8, generator=g)), "tokens": (Tokens, None)}


def data(model_name: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch of a step, the same in every process."""
    generator = torch.Generator().manual_seed(100 + step)
    if model_name == "tokens":
        x = torch.randint(0, 11, (BATCH, 5), generator=generator)
    else:
        x = MODELS[model_name][1](generator)
    return x, torch.randint(0, 3, (BATCH,), generator=generator)


def fresh(model_name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[model_name][0]()


def train(
    preset: str,
    model_name: str,
    loop: str,
    rank: int = 0,
    world: int = 1,
    shift: int = 0,
    wrapper: str = "ddp",
) -> list[torch.Tensor]:
    """The parameters after STEPS steps; when ``world`` > 1, each rank on its share under DDP or
    FSDP2 (``wrapper``, the parameters gathered whole at the end); ``shift``: the batch's examples
    rolled by that many places, summed in another order (what one process's rounding alone does)."""
    with iterating_in_float32():
        return trained(preset, model_name, loop, rank, world, shift, wrapper)


@contextmanager
def iterating_in_float32() -> Iterator[None]:
    """Newton–Schulz in float32 for the runs compared with one process. In bfloat16 a difference at
    float32's rounding (the batch's sums pooled over ranks) can cross a rounding step, and an
    ill-conditioned step grows it: BLOCKS on the conv net under FSDP2 ended 6.8e-3 off one process
    on an AMD EPYC with AVX-512 (states equal to 2.5e-7 after the second step, parameters 1.4e-4
    apart), and 2e-7 with the iteration in float32."""
    saved, matrix.ITERATION = matrix.ITERATION, torch.float32
    try:
        yield
    finally:
        matrix.ITERATION = saved


def trained(preset: str, model_name: str, loop: str, rank: int, world: int, shift: int, wrapper: str):
    """:func:`train` at the iteration's own precision."""
    model, opt = built(preset, model_name, world, wrapper)
    share = BATCH // world
    for step in range(STEPS):
        x, y = data(model_name, step)
        x, y = x.roll(shift, 0), y.roll(shift, 0)
        x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
        if loop == "closure" or opt.needs_closure:
            opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y))
        else:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return [(p.full_tensor() if world > 1 and wrapper == "fsdp2" else p).detach().clone() for p in model.parameters()]


def built(preset: str, model_name: str, world: int = 1, wrapper: str = "ddp") -> tuple[nn.Module, opcomp.Optimizer]:
    """The model as the ranks call it (wrapped when ``world`` > 1) and its optimizer."""
    model = fresh(model_name)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model) if wrapper == "ddp" else fully_sharded(model, world)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # coverage notices of the small models
        return model, opcomp.build(preset, model, lr=0.01)


def resumed(preset: str, rank: int, world: int, out_dir: Path) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Under FSDP2: STEPS steps straight, and STEPS − 1 steps, a DCP save, a fresh model and
    optimizer loaded from it, one more step. Both sets of parameters, gathered whole."""
    import torch.distributed.checkpoint as dcp

    from opcomp.integrations.dcp import load_optimizer

    straight = trained(preset, "conv", "closure", rank, world, 0, "fsdp2")  # in bfloat16, as the resumed run
    share, checkpoint = BATCH // world, out_dir / f"checkpoint-{preset}"

    def step(model, opt, number):
        x, y = data("conv", number)
        x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
        opt.step(lambda: F.cross_entropy(model(x), y))

    model, opt = built(preset, "conv", world, "fsdp2")
    for number in range(STEPS - 1):
        step(model, opt, number)
    dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=checkpoint)
    model, opt = built(preset, "conv", world, "fsdp2")
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=checkpoint)
    model.load_state_dict(state["model"])
    load_optimizer(checkpoint, opt)
    step(model, opt, STEPS - 1)
    return [p.full_tensor().clone() for p in model.parameters()], straight


@contextmanager
def counting(module, *names: str) -> Iterator[list[int]]:
    """Meanwhile, the last dimension of every matrix that ``module``'s functions ``names`` receive
    as their first argument (a batch of matrices)."""
    sizes, originals = [], {name: getattr(module, name) for name in names}

    def counted(operation):
        def run(batch, *args):
            sizes.extend([batch.shape[-1]] * batch.shape[0])
            return operation(batch, *args)

        return run

    for name, operation in originals.items():
        setattr(module, name, counted(operation))
    try:
        yield sizes
    finally:
        for name, operation in originals.items():
            setattr(module, name, operation)


def decompositions(rank: int = 0, world: int = 1) -> list[int]:
    """The sizes of the factors this rank inverted or eigendecomposed in fog's 3 steps on the conv
    net (kfac runs on the conv and the hidden Linear; the head runs adamw)."""
    from opcomp.kernels import decompositions as layers

    with counting(layers, "eigen", "damped_inverse") as sizes:
        train("fog", "conv", "closure", rank, world)
    return sorted(sizes)


def orthogonalised(rank: int = 0, world: int = 1) -> tuple[int, list[torch.Tensor]]:
    """muon_adamw for STEPS steps on three equal hidden Linears (one bucket): how many matrices this
    rank orthogonalised, and the parameters after."""
    from opcomp.kernels import matrix

    torch.manual_seed(0)
    model = nn.Sequential(*(m for _ in range(3) for m in (nn.Linear(8, 8), nn.Tanh())), nn.Linear(8, 3))
    wrapped = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = opcomp.build("muon_adamw", wrapped, lr=0.01)
    share = BATCH // world
    with counting(matrix, "newton_schulz") as sizes:
        for step in range(STEPS):
            generator = torch.Generator().manual_seed(step)
            x, y = torch.randn(BATCH, 8, generator=generator), torch.randint(0, 3, (BATCH,), generator=generator)
            x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
            opt.step(lambda x=x, y=y: F.cross_entropy(wrapped(x), y))
    return len(sizes), [p.detach().clone() for p in model.parameters()]


def cases() -> list[tuple[str, str, str]]:
    """(preset, model, loop) under DDP: every preset on both models through the closure; the plain
    loop where DDP's own backward reduces the gradients (presets without probes)."""
    out = [(preset, model, "closure") for preset in PRESETS for model in MODELS]
    out += [(SPARSE_UPDATES, "conv", "closure"), (GRADIENT_STATISTICS, "conv", "backward")]
    out += [(BLOCKS, model, "closure") for model in MODELS]
    return out + [(preset, "conv", "backward") for preset in ("fog", "ekfac_sgd", "diagfog")]


def sharded_cases() -> list[tuple[str, str, str]]:
    """(preset, model, loop) under FSDP2: the presets without probes, both loops."""
    out = [(p, m, loop) for p in ("adamw", "muon_adamw", "fog", "diagfog") for m in MODELS for loop in LOOPS]
    return out + [(BLOCKS, "conv", "backward")]


def refusals(world: int) -> dict[str, str]:
    """What building does where opcomp cannot be exact: the error's text, per situation."""
    out = {}
    for name, build in {
        "not wrapped": lambda: opcomp.build("fog", fresh("conv")),
        "fsdp2 probes": lambda: opcomp.build("sam_sgd", fully_sharded(fresh("conv"), world)),
        "fsdp2 shampoo": lambda: opcomp.build("shampoo", fully_sharded(fresh("conv"), world)),
    }.items():
        try:
            build()
            out[name] = "built"
        except opcomp.OpcompError as error:
            out[name] = str(error)
    out["local"] = type(opcomp.build("fog", fresh("conv"), data_parallel="local")).__name__
    return out


def fully_sharded(model: nn.Module, world: int) -> nn.Module:
    """FSDP2 as its documentation applies it: each layer sharded on its own, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d, nn.Embedding)):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def launch(out_dir: Path, world: int = 2) -> list[dict]:
    """Every case on ``world`` ranks; each rank's report."""
    ranks.launch([__file__], out_dir, world)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(world)]


def main(rank: int, world: int, port: int, out_dir: Path) -> None:
    with ranks.joined(rank, world, port):
        results = {case: train(*case, rank=rank, world=world) for case in cases()}
        sharded = {case: train(*case, rank=rank, world=world, wrapper="fsdp2") for case in sharded_cases()}
        assignments = {(p, m): built(p, m, world, "fsdp2")[1].assignments() for p, m, _ in sharded_cases()}
        report = {
            "results": results,
            "sharded": sharded,
            "sharded assignments": assignments,
            "refusals": refusals(world),
            "decompositions": decompositions(rank, world),
            "orthogonalised": orthogonalised(rank, world),
            "resumed": {preset: resumed(preset, rank, world, out_dir) for preset in ("adamw", "fog")},
        }
        torch.save(report, out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
