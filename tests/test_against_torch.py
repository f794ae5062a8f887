"""opcomp expressions against torch.optim's own optimizers, step for step."""

from __future__ import annotations

import copy
import warnings

import pytest
import shapes
import torch
from torch import nn
from torch.optim._muon import _zeropower_via_newtonschulz

import opcomp

pytestmark = pytest.mark.filterwarnings("ignore:.*NumPy.*")


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 3))


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.ReLU(), nn.Linear(8, 3)
    )


def batches(count: int, shape=(10,), seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(24, *shape, generator=generator), torch.randint(0, 3, (24,), generator=generator))
        for _ in range(count)
    ]


def train(model: nn.Module, optimizers, data, schedulers=()) -> None:
    for x, y in data:
        for opt in optimizers:
            opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for opt in optimizers:
            opt.step()
        for scheduler in schedulers:
            scheduler.step()


def side_by_side(pairs, schedulers, data, plateau: bool = False) -> None:
    """Train every (model, optimizer) pair on the same batches; then step every scheduler."""
    for x, y in data:
        for model, optimizer in pairs:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        for scheduler in schedulers:  # ReduceLROnPlateau gets a flat metric, so it does reduce
            scheduler.step(1.0) if plateau else scheduler.step()


def max_difference(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def two_groups(model: nn.Module, first_lr: float, second_lr: float):
    weights = [p for p in model.parameters() if p.ndim == 2]
    biases = [p for p in model.parameters() if p.ndim == 1]
    return [{"params": weights, "lr": first_lr}, {"params": biases, "lr": second_lr}]


def test_adamw_matches_torch_adamw_with_a_scheduler_and_two_groups():
    ours, theirs = mlp(), mlp()
    opt = opcomp.build("adamw[wd=0.05](g)", two_groups(ours, 3e-3, 1e-3), lr=1e-3)
    reference = torch.optim.AdamW(two_groups(theirs, 3e-3, 1e-3), weight_decay=0.05, foreach=False)
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=100) for o in (opt, reference)]
    side_by_side([(ours, opt), (theirs, reference)], schedulers, batches(100))
    assert max_difference(ours, theirs) <= 1e-6
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in reference.param_groups]
    assert max_difference(ours, mlp()) > 1e-2  # it did train


@pytest.mark.parametrize("compile_mode", ["off", "on"])
@pytest.mark.parametrize("model_name", sorted(shapes.MODELS))
@pytest.mark.parametrize(
    ("expression", "options"),
    [
        ("adamw[wd=0.05](g)", dict(weight_decay=0.05)),
        ("adam(g) + 0.03 * p", dict(weight_decay=0.03)),  # the decay peeled off the root
        (
            "adamw[b1=0.8, b2=0.99, eps=1e-6, wd=0.02](g) + 0.01 * p",
            dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=0.03),
        ),
    ],
)
def test_adam_or_adamw_alone_steps_bit_for_bit_as_torch_fused_adamw(expression, options, model_name, compile_mode):
    """Such an update runs torch's own fused kernel, compiled or not: the same bits as
    torch.optim.AdamW(fused=True) step after step, on convolutions, embeddings and linears, with
    a schedule moving the rate."""
    models = [shapes.make(model_name, dtype=torch.float32) for _ in range(2)]
    x, y = shapes.batch(model_name, dtype=torch.float32)
    ours = opcomp.build(expression, models[0], lr=0.01, compile=compile_mode)
    theirs = torch.optim.AdamW(models[1].parameters(), lr=0.01, fused=True, **options)
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=8) for o in (ours, theirs)]
    for _ in range(6):
        for model, opt in zip(models, (ours, theirs)):
            opt.zero_grad()
            shapes.loss(model, x, y).backward()
            opt.step()
        for scheduler in schedulers:
            scheduler.step()
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)
    assert max_difference(models[0], shapes.make(model_name, dtype=torch.float32)) > 1e-3  # it did train


@pytest.mark.parametrize("compile_mode", ["off", "on"])
@pytest.mark.parametrize(
    ("fallback", "rate", "decay"), [("adamw[wd=0.02]", 0.01, 0.02), ("0.1 * adamw", 0.01 * 0.1, 0.01)]
)
def test_the_adamw_branch_of_muon_or_adamw_steps_bit_for_bit_as_torch_fused_adamw(compile_mode, fallback, rate, decay):
    """Buckets of a mixed family run torch's fused kernel too, beside the muon buckets (compiled
    or not), told by the one check of the step; fog's scaled fallback as AdamW at a tenth of the
    rate."""
    generator = torch.Generator().manual_seed(5)
    sizes = [(12, 8), (7,), (12, 8), (13,), (7,)]
    ours = [nn.Parameter(torch.randn(s, generator=generator)) for s in sizes]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours if p.ndim == 1]
    opt = opcomp.build(f"muon(g) | {fallback}(g)", ours, lr=0.01, compile=compile_mode)
    reference = torch.optim.AdamW(theirs, lr=rate, weight_decay=decay, fused=True)
    for step in range(5):
        grads = [torch.randn(s, generator=generator) for s in sizes]
        if step == 3:
            grads[0][1, 1] = float("nan")  # a skipped step: no bucket moves, no counter advances
        for p, g in zip(ours, grads):
            p.grad = g
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
        if step != 3:
            for p, g in zip(theirs, [g for g in grads if g.ndim == 1]):
                p.grad = g
            reference.step()
    assert opt.skipped_steps == 1
    assert sorted("adamw" in branch for branch in opt.assignments().values()) == [False] * 2 + [True] * 3
    for a, b in zip([p for p in ours if p.ndim == 1], theirs):
        assert torch.equal(a, b)


def test_an_adam_option_the_fused_kernel_cannot_express_keeps_opcomps_kernels(monkeypatch):
    """Should ``adam`` gain an option torch's kernel has no argument for, its buckets step through
    opcomp's own kernels instead of dropping it."""
    from dataclasses import replace

    from opcomp.ops import REGISTRY

    params = [nn.Parameter(torch.randn(6, 5)), nn.Parameter(torch.randn(5))]
    spec = REGISTRY.specs["adamw"]
    monkeypatch.setitem(REGISTRY.specs, "adamw", replace(spec, fused_adamw=frozenset({"b1", "b2", "eps"})))
    opt = opcomp.build("adamw", params, lr=0.01)
    calls = []
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: calls.append(1))
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    opt.step()
    assert calls == [] and all(not torch.equal(a, b) for a, b in zip(before, params))


@pytest.mark.parametrize("model_name", ["strided_conv", "token_model"])
def test_fogs_fallback_runs_torchs_fused_kernel_after_the_step_is_decided(model_name, monkeypatch):
    """In a family with layer statistics the AdamW buckets step once every check has passed: the
    parameters follow what opcomp's own kernels gave, within float rounding, and a step given up
    changes nothing (tests/test_robustness.py)."""
    from opcomp.step import fused

    calls = []
    original = fused.fused_adamw
    monkeypatch.setattr(fused, "fused_adamw", lambda *a, **k: calls.append(1) or original(*a, **k))
    models = [shapes.make(model_name, dtype=torch.float32) for _ in range(2)]
    x, y = shapes.batch(model_name, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # coverage notices of the small models
        ours = opcomp.build("fog", models[0], lr=0.01)
        generic = opcomp.build("fog", models[1], lr=0.01)
    for _ in range(4):
        for model, opt in zip(models, (ours, generic)):
            opt.zero_grad()
            shapes.loss(model, x, y).backward()
            with monkeypatch.context() as patched:
                if opt is generic:  # every bucket through opcomp's own kernels
                    patched.setattr(opt._stepper.routes, "fused", {})
                opt.step()
    assert calls  # the fallback did run the fused kernel
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert max_difference(models[0], shapes.make(model_name, dtype=torch.float32)) > 1e-3  # it did train


@pytest.mark.parametrize("nesterov", [True, False])
def test_momentum_matches_torch_sgd(nesterov):
    ours, theirs = mlp(), mlp()
    flag = ", nesterov" if nesterov else ""
    opt = opcomp.build(f"momentum[beta=0.9{flag}](g)", two_groups(ours, 0.05, 0.02), lr=0.05)
    reference = torch.optim.SGD(two_groups(theirs, 0.05, 0.02), momentum=0.9, nesterov=nesterov)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=30, gamma=0.5) for o in (opt, reference)]
    side_by_side([(ours, opt), (theirs, reference)], schedulers, batches(100))
    assert max_difference(ours, theirs) <= 1e-6


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_muon_matches_torch_muon_on_matrices(weight_decay):
    torch.manual_seed(3)
    shapes = [(32, 16), (16, 32), (24, 24), (64, 8)]
    ours = [nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    expression = f"muon(g) + {weight_decay} * p" if weight_decay else "muon(g)"
    opt = opcomp.build(expression, ours, lr=0.02)
    reference = torch.optim.Muon(theirs, lr=0.02, weight_decay=weight_decay)
    targets = [torch.randn(s) for s in shapes]
    for _ in range(50):
        for params, optimizer in ((ours, opt), (theirs, reference)):
            optimizer.zero_grad()
            sum(((p - t) ** 3).abs().sum() for p, t in zip(params, targets)).backward()
            optimizer.step()
    worst = max((p - q).abs().max().item() for p, q in zip(ours, theirs))
    assert worst <= 1e-5
    assert max((p - t).abs().max().item() for p, t in zip(ours, targets)) < 10  # moved, did not blow up


def naive_muon_step(param: torch.Tensor, buffer: torch.Tensor, lr: float) -> None:
    """docs/operators.md's muon on a parameter viewed as (rows, −1), written out for any ndim."""
    grad = param.grad
    buffer.lerp_(grad, 0.05)
    update = grad.lerp(buffer, 0.95).reshape(param.shape[0], -1)
    rows, cols = update.shape
    ortho = _zeropower_via_newtonschulz(update, (3.4445, -4.7750, 2.0315), 5, 1e-7).float()
    param.add_(ortho.reshape(param.shape), alpha=-lr * max(1.0, rows / cols) ** 0.5)


def test_muon_or_adamw_gives_each_cnn_parameter_its_branch():
    ours, theirs = cnn(), cnn()
    opt = opcomp.build("muon(g) | adamw(g)", ours, lr=0.01)
    matrices = {n: p for n, p in theirs.named_parameters() if p.ndim >= 2}
    vectors = [p for p in theirs.parameters() if p.ndim < 2]
    reference_adamw = torch.optim.AdamW(vectors, lr=0.01, weight_decay=0.01)
    buffers = {n: torch.zeros_like(p) for n, p in matrices.items()}
    for x, y in batches(20, shape=(1, 6, 6)):
        opt.zero_grad()
        nn.functional.cross_entropy(ours(x), y).backward()
        opt.step()
        reference_adamw.zero_grad()
        for p in matrices.values():
            p.grad = None
        nn.functional.cross_entropy(theirs(x), y).backward()
        reference_adamw.step()
        with torch.no_grad():
            for name, p in matrices.items():
                naive_muon_step(p, buffers[name], 0.01)
    assert {n for n, p in ours.named_parameters() if p.ndim == 4} == {"0.weight"}
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert (p - q).abs().max().item() <= 1e-5, name
    assert opt.assignments() == {
        "0.weight": "muon",
        "0.bias": "adamw",
        "3.weight": "muon",
        "3.bias": "adamw",
        "5.weight": "muon",
        "5.bias": "adamw",
    }


def test_a_parameter_group_can_carry_its_own_expression():
    ours, theirs = mlp(), mlp()
    weights = [p for p in ours.parameters() if p.ndim == 2]
    biases = [p for p in ours.parameters() if p.ndim == 1]
    opt = opcomp.build("adamw", [{"params": weights, "expr": "momentum[beta=0.9](g)"}, {"params": biases}], lr=0.01)
    reference = [
        torch.optim.SGD([p for p in theirs.parameters() if p.ndim == 2], lr=0.01, momentum=0.9),
        torch.optim.AdamW([p for p in theirs.parameters() if p.ndim == 1], lr=0.01, weight_decay=0.01),
    ]
    for x, y in batches(30):
        opt.zero_grad()
        nn.functional.cross_entropy(ours(x), y).backward()
        opt.step()
        train(theirs, reference, [(x, y)])
    assert max_difference(ours, theirs) <= 1e-6
    assert opt.param_groups[0]["expr"].startswith("momentum[") and opt.param_groups[1]["expr"].startswith("adamw[")


def test_add_param_group_later_and_copying_a_model_does_not_alias():
    model = mlp()
    first, *rest = list(model.parameters())
    opt = opcomp.build("adamw", [first], lr=0.01)
    opt.add_param_group({"params": rest, "expr": "momentum(g)", "lr": 0.1})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.1
    before = copy.deepcopy(model)
    train(model, [opt], batches(3))
    assert all((p - q).abs().max() > 0 for p, q in zip(model.parameters(), before.parameters()))


SCHEDULERS = {
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 0.9**t),
    "MultiplicativeLR": lambda o: torch.optim.lr_scheduler.MultiplicativeLR(o, lambda t: 0.95),
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, 3),
    "MultiStepLR": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [2, 5]),
    "ConstantLR": lambda o: torch.optim.lr_scheduler.ConstantLR(o, 0.5, total_iters=4),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=5),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.8),
    "PolynomialLR": lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=8, power=2.0),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 8),
    "CosineAnnealingWarmRestarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, 3),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, 1e-3, 1e-2, 2, cycle_momentum=False),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 1e-2, total_steps=10, cycle_momentum=False),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o,
        [torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=3), torch.optim.lr_scheduler.ExponentialLR(o, 0.9)],
        milestones=[3],
    ),
    "ChainedScheduler": lambda o: torch.optim.lr_scheduler.ChainedScheduler(
        [torch.optim.lr_scheduler.ConstantLR(o, 0.5, total_iters=2), torch.optim.lr_scheduler.ExponentialLR(o, 0.9)]
    ),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=1, factor=0.5),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_lr_scheduler_drives_the_learning_rate_as_for_torch_adamw(name):
    ours, theirs = mlp(), mlp()
    opt = opcomp.build("adamw(g)", two_groups(ours, 3e-3, 1e-3), lr=1e-3)
    reference = torch.optim.AdamW(two_groups(theirs, 3e-3, 1e-3), weight_decay=0.01)
    schedulers = [SCHEDULERS[name](o) for o in (opt, reference)]
    for batch in batches(10):
        side_by_side([(ours, opt), (theirs, reference)], schedulers, [batch], plateau=name == "ReduceLROnPlateau")
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in reference.param_groups]
    assert max_difference(ours, theirs) <= 1e-6


def test_gradients_that_are_not_contiguous_step_as_torchs_fused_adamw_on_their_values():
    """The fused route is decided at build from the parameters; a gradient laid out otherwise (a
    transpose, an expanded row) is made contiguous for the kernel, and the step is torch's bit for bit."""
    torch.manual_seed(0)
    ours = [nn.Parameter(torch.randn(6, 5)), nn.Parameter(torch.randn(5))]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    opt = opcomp.build("adamw", ours, lr=0.01)
    reference = torch.optim.AdamW(theirs, lr=0.01, weight_decay=0.01, fused=True)
    for _ in range(3):
        grads = [torch.randn(5, 6).T, torch.randn(1).expand(5)]
        for param, grad in zip(ours, grads):
            param.grad = grad
        for param, grad in zip(theirs, grads):
            param.grad = grad.contiguous()
        opt.step()
        reference.step()
    assert not ours[0].grad.is_contiguous()
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_a_model_cast_after_the_build_steps_as_one_built_in_that_precision():
    """The fused route is decided at build; parameters cast to bfloat16 afterwards step in opcomp's
    fp32 working copy (as an optimizer built on them does), not in torch's bfloat16 kernel."""
    torch.manual_seed(0)
    cast, built = nn.Linear(6, 4), nn.Linear(6, 4)
    built.load_state_dict(cast.state_dict())
    opt_cast = opcomp.build("adamw", cast, lr=0.01)
    cast.to(torch.bfloat16)
    built.to(torch.bfloat16)
    opt_built = opcomp.build("adamw", built, lr=0.01)
    for _ in range(3):
        x = torch.randn(5, 6, dtype=torch.bfloat16)
        for model, opt in ((cast, opt_cast), (built, opt_built)):
            opt.zero_grad()
            model(x).float().square().sum().backward()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(cast.parameters(), built.parameters()))
