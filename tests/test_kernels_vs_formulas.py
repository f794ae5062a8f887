"""Each remaining kernel against torch.optim or docs/operators.md's formula computed naively, over several steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim._muon import _zeropower_via_newtonschulz

import opcomp

STEPS = 6


def gradients(shape, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(STEPS)]


def run(expression: str, grads: list[torch.Tensor]) -> torch.Tensor:
    """Σ of the directions over the steps: the parameter starts at 0, lr = 1, ``p`` is never read."""
    param = nn.Parameter(torch.zeros_like(grads[0]))
    opt = opcomp.build(expression, [param], lr=1.0)
    for grad in grads:
        param.grad = grad.clone()
        opt.step()
    return -param.detach()


def against_torch(optimizer_class, expression: str, **kwargs) -> float:
    grads = gradients((5, 7))
    ours = run(expression, grads)
    param = nn.Parameter(torch.zeros(5, 7))
    reference = optimizer_class([param], lr=1.0, **kwargs)
    for grad in grads:
        param.grad = grad.clone()
        reference.step()
    return (ours + param.detach()).abs().max().item()


def test_adam_matches_torch_adam():
    assert against_torch(torch.optim.Adam, "adam[b1=0.8, b2=0.99, eps=1e-6](g)", betas=(0.8, 0.99), eps=1e-6) <= 1e-6


def test_rms_matches_torch_rmsprop():
    assert against_torch(torch.optim.RMSprop, "rms[beta=0.9, eps=1e-6](g)", alpha=0.9, eps=1e-6) <= 1e-6


@pytest.mark.parametrize("debias", [False, True])
def test_ema(debias):
    grads = gradients((4, 3))
    m, total = torch.zeros(4, 3), torch.zeros(4, 3)
    for t, g in enumerate(grads, 1):
        m = 0.7 * m + 0.3 * g
        total += m / (1 - 0.7**t) if debias else m
    flag = ", debias" if debias else ""
    assert torch.allclose(run(f"ema[beta=0.7{flag}](g)", grads), total, atol=1e-5)


def test_diag_fisher_divides_its_input_by_the_ema_of_the_squared_gradient():
    grads = gradients((4, 3))
    f, total = torch.zeros(4, 3), torch.zeros(4, 3)
    for g in grads:
        f = 0.9 * f + 0.1 * g * g
        total += torch.sign(g) / (f + 1e-3)
    assert torch.allclose(run("diag_fisher[beta=0.9, eps=1e-3](sign(g))", grads), total, rtol=1e-5)


def test_clip_shrinks_to_max_norm_and_leaves_small_inputs():
    grads = [torch.full((3, 3), 1.0), torch.full((3, 3), 0.01)]
    assert torch.allclose(run("clip[max_norm=0.5](g)", grads[:1]), torch.full((3, 3), 0.5 / 3))
    assert torch.equal(run("clip[max_norm=0.5](g)", grads[1:]), grads[1])


@pytest.mark.parametrize("shape", [(16, 8), (8, 16)])
def test_adarmsuon_is_adam_energy_on_the_orthogonalised_adam_direction(shape):
    grads = gradients(shape)
    param = nn.Parameter(torch.zeros(shape))
    adam = torch.optim.Adam([param], lr=1.0)  # the adam direction is what it subtracts
    total = torch.zeros(shape)
    for grad in grads:
        before = param.detach().clone()
        param.grad = grad.clone()
        adam.step()
        a = before - param.detach()
        o = _zeropower_via_newtonschulz(a, (3.4445, -4.7750, 2.0315), 5, 1e-7).float()
        total += o * (a.norm() / o.norm())
    assert (run("adarmsuon(g)", grads) - total).abs().max() <= 1e-3 * total.abs().max()


@pytest.mark.parametrize("max_norm", [0.5, 100.0])  # binds every step; never binds
@pytest.mark.parametrize("compile_mode", ["off", pytest.param("on", marks=pytest.mark.compile)])
def test_clip_global_then_adamw_equals_torch_clip_grad_norm_then_adamw(max_norm, compile_mode):
    """One norm over every parameter, whatever its shape or bucket, as torch.nn.utils.clip_grad_norm_."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    ours = opcomp.build(f"adamw(clip_global[max_norm={max_norm}](g))", models[0], lr=0.01, compile=compile_mode)
    theirs = torch.optim.AdamW(models[1].parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = torch.randn(8, 3, generator=generator), torch.randn(8, 2, generator=generator)
        for model in models:
            model.zero_grad()
            (model(x) - y).square().sum().backward()
        norm = torch.nn.utils.clip_grad_norm_(models[1].parameters(), max_norm)
        assert (norm > max_norm) == (max_norm == 0.5)
        ours.step()
        theirs.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
