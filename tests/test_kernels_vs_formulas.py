"""Each remaining kernel against torch.optim or DESIGN.md's formula computed naively, over several steps."""

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
