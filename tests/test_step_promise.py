"""A step changes the parameters by what the expression says, or changes nothing: reentrant
checkpointing is refused before anything moves, a Hessian term that does not exist is zero, and
a step whose update or new parameters would be inf or NaN is skipped like a non-finite gradient."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

import opcomp


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.first, self.middle, self.head = nn.Linear(8, 8), nn.Linear(8, 16), nn.Linear(16, 4)
        self.reentrant = reentrant

    def forward(self, x):
        inner = checkpoint(lambda t: torch.relu(self.middle(t)), self.first(x), use_reentrant=self.reentrant)
        return self.head(inner)


def snapshot(model: nn.Module, opt) -> tuple[list[torch.Tensor], dict]:
    return [p.detach().clone() for p in model.parameters()], opt.state_dict()


@pytest.mark.parametrize("preset", ["sam_sgd", "f3eo", "adagnoema", "fs_adarmsuon", "fog"])
def test_reentrant_checkpointing_is_refused_at_the_first_step_with_nothing_changed(preset):
    torch.manual_seed(0)
    model = Checkpointed(reentrant=True)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", opcomp.OpcompWarning)
        opt = opcomp.build(preset, model)
    before, state = snapshot(model, opt)
    with pytest.raises(opcomp.OpcompError, match="use_reentrant=False"):
        opt.step(lambda: F.cross_entropy(model(x), y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.state_dict() == state and opt.skipped_steps == 0
    model.reentrant = False  # the fix the message names: the same optimizer steps on
    opt.step(lambda: F.cross_entropy(model(x), y))
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def hessian(model: nn.Module, loss_of) -> torch.Tensor:
    """The full Hessian of the loss over the flattened parameters, by torch.func."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])

    def loss(vector):
        pieces = torch.split(vector, [s.numel() for s in shapes])
        params = {n: v.reshape(s) for n, v, s in zip(names, pieces, shapes)}
        return loss_of(lambda x: torch.func.functional_call(model, params, (x,)))

    return torch.func.hessian(loss)(flat)


@pytest.mark.parametrize("expression", ["hvp", "gnvp"])
def test_a_loss_linear_in_some_parameters_has_zero_curvature_there(expression):
    """loss = mean(m(x)) with a scalar head: its bias (and, for Gauss–Newton, everything: the loss
    is linear in the output, H_L = 0) has no second derivative. The step at lr 1 is H·g, against
    the explicit Hessian (Gauss–Newton: 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    opt = opcomp.build(expression, model, lr=1.0)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    loss = model(x).mean()
    grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])
    expected = hessian(model, lambda m: m(x).mean()) @ grad if expression == "hvp" else torch.zeros_like(grad)
    opt.step(lambda: model(x).mean())
    moved = before - torch.cat([p.detach().flatten() for p in model.parameters()])
    if expression == "hvp":  # the head's bias has a zero row; the rest does not
        assert expected[-1] == 0 and expected.abs().max() > 1e-3
    torch.testing.assert_close(moved, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("preset", ["f3eo", "adagnoema", "diag_hessian", "lgn"])
@pytest.mark.parametrize("zero_size", [False, True])
def test_second_order_presets_step_on_a_loss_linear_in_a_parameter(preset, zero_size):
    torch.manual_seed(0)
    model = nn.Linear(4, 0) if zero_size else nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    x = torch.randn(16, 4)
    opt = opcomp.build(preset, model)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        opt.step(lambda: model(x).sum() if zero_size else model(x).mean())
    assert opt.skipped_steps == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert zero_size or not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize(
    ("expression", "problem"),
    [
        ("adamw[eps=1e-50]", "rounds to 0 in float32"),
        ("adam[eps=1e-50]", "rounds to 0 in float32"),
        ("rms[eps=1e-50]", "rounds to 0 in float32"),
        ("diag_fisher[eps=1e-50]", "rounds to 0 in float32"),
        ("adarmsuon[eps=1e-50] | adamw", "rounds to 0 in float32"),
        ("1e39 * g", r"the factor 1e\+39 overflows to inf in float32"),
        ("sam[rho=1e39](momentum)", "overflows to inf in float32"),
        ("adamw(grad_at[rho=1e39](g))", "overflows to inf in float32"),
        ("zo[eps=1e39]", "overflows to inf in float32"),
        ("lion[wd=1e39]", "overflows to inf in float32"),
        ("zo[newton, eps=1e-170]", "eps² = 0, which underflows"),
    ],
)
def test_options_the_working_precision_cannot_hold_are_refused_at_build(expression, problem):
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    with pytest.raises(opcomp.OpcompError, match=problem):
        opcomp.build(expression, model)


def test_an_option_that_float64_holds_builds_for_float64_parameters():
    model = nn.Linear(4, 3).double()
    opt = opcomp.build("adamw[eps=1e-50]", model)
    model(torch.randn(2, 4, dtype=torch.float64)).sum().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def overflowing(expression: str, compiled: str = "off") -> None:
    """One step with gradients ~1e24: its update (or the second moment it writes) is inf in fp32
    though every option and gradient is finite. It is skipped: parameters and state as before."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = opcomp.build(expression, model, lr=1e-21 if "1e20" in expression else 0.1, compile=compiled)
        for _ in range(2):  # state exists; the second step is compiled where compile="on"
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    before, state = [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for p in model.parameters():
        p.grad.mul_(1e25)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    after = opt.state_dict()["state"]
    for index, entries in state["state"].items():
        for key, buffers in entries.items():
            assert all(torch.equal(t, after[index][key][n]) for n, t in buffers.items()), key


@pytest.mark.parametrize(
    "expression",
    [
        "1e20 * momentum(g)",  # the update overflows
        "rms(g)",  # the update is finite (g/√inf = 0), the second moment it writes is inf
        "lion(g) + 1e20 * g",
        "kfac(g) | 1e20 * momentum(g)",  # layer statistics (the norm falls back): updates handed back
        "muon(g) | 1e20 * g",
    ],
)
def test_a_step_whose_update_or_state_is_not_finite_is_skipped_with_nothing_changed(expression):
    overflowing(expression)


@pytest.mark.compile
def test_a_compiled_step_whose_update_is_not_finite_is_skipped_with_nothing_changed():
    overflowing("rms(g)", compiled="on")


@pytest.mark.parametrize(
    "expression, lr, overflows",
    [
        ("adamw(g)", 3e38, False),  # above the fused kernel's reach: the checked route, which may keep it
        ("adamw[wd=0.5](g)", 3e38, True),  # p·(1 − lr·wd) alone is ~1e38 per unit of p: past the largest float
        ("kfac(g) | adamw(g)", 3e38, False),
        ("kfac(g) | adamw(g)", 3.402823466385289e38, True),  # the lr itself is over fp32's largest float
        ("momentum(g)", 3.402823466385289e38, True),  # the eager in-place route
    ],
)
def test_a_learning_rate_that_pushes_parameters_past_the_largest_float_skips_the_step(expression, lr, overflows):
    """Finite gradients, a finite lr (a corrupted checkpoint's, a schedule gone wrong): the
    parameters stay finite on every route (torch's fused AdamW included); a step that would pass
    the largest float is skipped with parameters as they were."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight.mul_(40.0)  # |p| > 1: lr·wd·|p| alone passes 3.4e38 for the decaying rows
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt = opcomp.build(expression, model, lr=1e-3)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for group in opt.param_groups:
        group["lr"] = lr
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.skipped_steps == (1 if overflows else opt.skipped_steps)
    if opt.skipped_steps:
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
