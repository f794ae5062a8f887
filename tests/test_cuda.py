"""What a CUDA device changes, checked on it: torch's fused AdamW kernel, the step decided on the
device, host synchronisations counted by CUDA's own debug mode, DCP and compiled steps.

Every test here also runs on the CPU (what it can check there) so that the code is exercised on
every machine; the ``cuda`` rows skip without a CUDA device. ``python -m opcomp.bench.gpu_check``
runs them (``pytest -m cuda``) with the step and KFAC benchmarks and writes one table.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.nn import functional as F

import opcomp
from opcomp.bench import gpu_check
from opcomp.bench.gpu_check import host_syncs
from opcomp.integrations.dcp import load_optimizer

CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(
            not torch.cuda.is_available(), reason="needs a CUDA device (python -m opcomp.bench.gpu_check runs these)"
        ),
    ],
)
DEVICES = ["cpu", CUDA]


def model(device: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 7 * 7, 32), nn.ReLU(), nn.Linear(32, 10)
    ).to(device)


def batch(device: str, number: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + number)
    return torch.randn(16, 3, 16, 16, generator=generator).to(device), torch.randint(
        0, 10, (16,), generator=generator
    ).to(device)


def step(net: nn.Module, opt: torch.optim.Optimizer, number: int, poison: bool = False) -> None:
    x, y = batch(next(net.parameters()).device.type, number)
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    if poison:
        next(net.parameters()).grad.view(-1)[0] = float("nan")
    opt.step()


@pytest.mark.parametrize("device", DEVICES)
def test_adamw_steps_as_torchs_fused_adamw_bit_for_bit(device):
    ours, theirs = model(device), model(device)
    opt = opcomp.build("adamw[wd=0.05]", ours, lr=3e-3)
    reference = torch.optim.AdamW(theirs.parameters(), lr=3e-3, weight_decay=0.05, fused=True)
    for number in range(6):
        step(ours, opt, number)
        step(theirs, reference, number)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("expression", ["fog", "fog_amortized", "muon(ekfac(g)) | adamw"])
@pytest.mark.parametrize("device", DEVICES)
def test_the_device_decided_step_keeps_what_the_host_decided_one_keeps(device, expression, monkeypatch):
    """On CUDA a step with layer statistics decides on the device (on the CPU, forced): against the
    same optimizer deciding on the host, over steps with NaN gradients, the same parameters and skips."""
    from opcomp.step import transactional

    runs = []
    for on_device in (False, True):
        monkeypatch.setattr(transactional, "decides_on_device", lambda params, answer=on_device: answer)
        net = model(device)
        opt = opcomp.build(expression, net, lr=0.01)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the skip warnings and coverage notices
            for number in range(8):
                step(net, opt, number, poison=number in (2, 5))
        runs.append((net, opt))
    (host, host_opt), (on_device, device_opt) = runs
    for a, b in zip(host.parameters(), on_device.parameters()):
        assert torch.equal(a, b)
    assert host_opt.skipped_steps == device_opt.skipped_steps == 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (python -m opcomp.bench.gpu_check)")
@pytest.mark.parametrize("expression", ["adamw", "muon(g) | adamw", "fog_amortized[update_every=10, invert_every=10]"])
def test_steps_after_the_first_make_no_host_synchronisation(expression):
    """Counted by CUDA itself (torch.cuda.set_sync_debug_mode): fog_amortized's steps 2–6 neither
    refresh statistics nor inverses, so none reads."""
    x, y = batch("cuda", 0)
    assert host_syncs(expression, model("cuda"), lambda net: F.cross_entropy(net(x), y)) == [0] * 5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what the GPU check says where there is no GPU")
def test_the_gpu_check_says_plainly_that_there_is_no_cuda_device(capsys, tmp_path):
    assert gpu_check.main(["--out", str(tmp_path / "check.md")]) == 2
    assert "no CUDA device" in capsys.readouterr().out and not (tmp_path / "check.md").exists()


@pytest.mark.parametrize("expression", ["adamw", "fog"])
@pytest.mark.parametrize("device", DEVICES)
def test_state_saved_with_dcp_resumes_bit_for_bit(device, expression, tmp_path):
    straight = model(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = opcomp.build(expression, straight, lr=0.01)
        for number in range(4):
            step(straight, opt, number)
        resumed = model(device)
        opt = opcomp.build(expression, resumed, lr=0.01)
        for number in range(3):
            step(resumed, opt, number)
        dcp.save({"model": resumed.state_dict(), "optim": opt.state_dict()}, checkpoint_id=tmp_path)
        fresh = model(device, seed=1)
        opt = opcomp.build(expression, fresh, lr=0.01)
        state = {"model": fresh.state_dict()}
        dcp.load(state, checkpoint_id=tmp_path)
        fresh.load_state_dict(state["model"])
        load_optimizer(tmp_path, opt)
        step(fresh, opt, 3)
    for a, b in zip(straight.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


@pytest.mark.compile
@pytest.mark.parametrize("expression", ["lion", "adamw[wd=0.1] + 0.01 * sign(g)"])
@pytest.mark.parametrize("device", [CUDA])  # on the CPU: tests/test_compile.py
def test_a_compiled_step_agrees_with_the_eager_one(device, expression):
    """Over four steps the compiled parameters end where the eager ones do, up to float rounding
    (1e-5 of the distance they travelled). Element-wise expressions: Muon's bfloat16 Newton–Schulz
    rounds apart compiled and eager by several percent of an update on small matrices."""
    eager, compiled = model(device), model(device)
    start = [p.detach().clone() for p in eager.parameters()]
    optimizers = [
        opcomp.build(expression, eager, lr=1e-2, compile="off"),
        opcomp.build(expression, compiled, lr=1e-2, compile="on"),
    ]
    for number in range(4):
        for net, opt in zip((eager, compiled), optimizers):
            step(net, opt, number)
    for a, b, a0 in zip(eager.parameters(), compiled.parameters(), start):
        assert torch.linalg.vector_norm(a - b) <= 1e-5 * torch.linalg.vector_norm(a - a0)


@pytest.mark.compile
@pytest.mark.parametrize("device", [CUDA])  # on the CPU: tests/test_compiled_capture.py
def test_a_compiled_model_feeds_kfac_as_its_eager_twin(device):
    """The capture's custom ops on CUDA (their ticket is a CPU tensor): a model compiled with
    aot_eager steps ``kfac(g) | g`` as its eager twin, to the rounding of CUDA's kernels, with
    no graph break."""
    from torch._dynamo.utils import counters

    eager, traced = model(device), model(device)
    optimizers = [opcomp.build("kfac(g) | g", eager, lr=1e-2), opcomp.build("kfac(g) | g", traced, lr=1e-2)]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(traced, backend="aot_eager")
    for number in range(3):
        step(eager, optimizers[0], number)
        x, y = batch(device, number)
        optimizers[1].zero_grad()
        F.cross_entropy(compiled(x), y).backward()
        optimizers[1].step()
    assert sum(counters["graph_break"].values()) == 0
    for a, b in zip(eager.parameters(), traced.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
