"""SAM and ASAM against pytorch-optimizer's SAM (an independent library), step by step, and ASAM
with Kwon et al.'s η against its formula written out.

pytorch-optimizer's ``SAM(adaptive=True)`` takes T = |p| (η = 0); opcomp's ``sam[adaptive]``
takes T = |p| + eta with eta = 0.01 by default (Kwon et al. 2021, docs/probes.md), so the library is
matched with ``eta=0`` and the default is checked against the formula.
"""

from __future__ import annotations

import copy

import pytest
import torch
from pytorch_optimizer import SAM
from shapes import batch, loss, make

import opcomp

CASES = [  # opcomp expression, pytorch-optimizer base optimizer and its options, SAM's options
    ("sam[rho=0.05](g)", torch.optim.SGD, {}, {"rho": 0.05}),
    ("sam[rho=0.05](momentum[beta=0.9](g))", torch.optim.SGD, {"momentum": 0.9}, {"rho": 0.05}),
    (
        "sam[adaptive, eta=0, rho=0.5](momentum[beta=0.9](g))",
        torch.optim.SGD,
        {"momentum": 0.9},
        {"rho": 0.5, "adaptive": True},
    ),
    # adamw(sam(g)): every Adam statistic reads g_sam, the usual SAM-AdamW (sam(adamw) is FS-AdaRMSuon's)
    ("adamw[wd=0.01](sam[rho=0.05](g))", torch.optim.AdamW, {"weight_decay": 0.01}, {"rho": 0.05}),
]


@pytest.mark.parametrize("name", ["mlp", "strided_conv", "token_model"])
@pytest.mark.parametrize(("expression", "base", "base_options", "sam_options"), CASES)
def test_sam_family_steps_like_pytorch_optimizer(expression, base, base_options, sam_options, name):
    ours, theirs = make(name), make(name)
    lr = 0.05
    opt = opcomp.build(expression, ours, lr=lr)
    reference = SAM(theirs.parameters(), base, perturb_eps=0.0, lr=lr, **sam_options, **base_options)
    for step in range(4):
        x, y = batch(name, 16, seed=step)

        def closure(model=theirs, x=x, y=y):
            reference.zero_grad()
            value = loss(model, x, y)
            value.backward()
            return value

        closure()  # SAM's protocol: gradients at p first, then step(closure) for the shifted point
        reference.step(closure)
        opt.step(lambda x=x, y=y: loss(ours, x, y))
    for a, b in zip(ours.parameters(), theirs.parameters()):
        # pytorch-optimizer sums the squared gradient norm in float32 (get_global_gradient_norm)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_asam_perturbation_follows_kwon_et_al_with_eta():
    """g_asam = ∇L(p + ε), ε = rho·T²g/‖Tg‖, T = |p| + 0.01: the shifted point has ‖T⁻¹ε‖ = rho."""
    model = make("strided_conv")
    x, y = batch("strided_conv", 16)
    rho = 0.5
    reference = copy.deepcopy(model)
    params = list(reference.parameters())
    g = torch.autograd.grad(loss(reference, x, y), params)
    scales = [p.detach().abs() + 0.01 for p in params]
    norm = torch.sqrt(sum(((t * gi) ** 2).sum() for t, gi in zip(scales, g)))
    shifts = [rho * t * t * gi / norm for t, gi in zip(scales, g)]
    assert abs(float(torch.sqrt(sum(((e / t) ** 2).sum() for e, t in zip(shifts, scales)))) - rho) < 1e-12
    with torch.no_grad():
        for p, e in zip(params, shifts):
            p.add_(e)
    expected = torch.autograd.grad(loss(reference, x, y), params)
    opt = opcomp.build(f"sam[adaptive, rho={rho}](g)", model, lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(lambda: loss(model, x, y))
    for b, p, e in zip(before, model.parameters(), expected):
        torch.testing.assert_close(b - p.detach(), e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "strided_conv", "token_model"])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_lion_steps_like_pytorch_optimizer(name, wd):
    from pytorch_optimizer import Lion

    ours, theirs = make(name), make(name)
    lr = 1e-3
    opt = opcomp.build(f"lion[b1=0.9, b2=0.99, wd={wd}](g)", ours, lr=lr)
    reference = Lion(theirs.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=wd)
    for step in range(5):
        x, y = batch(name, 16, seed=step)
        for model, optimizer in ((ours, opt), (theirs, reference)):
            optimizer.zero_grad()
            loss(model, x, y).backward()
            optimizer.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        # decoupled decay: p(1 − lr·wd) − lr·u there, p − lr·(u + wd·p) here; the same to rounding
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
