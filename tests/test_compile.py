"""The compiled step: the same numbers as eager, and no recompiles as the learning rate moves.

A cold compile costs seconds on this CPU, so these tests are few and marked ``compile``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from device_reads import counted_reads
from hypothesis import given, settings
from hypothesis import strategies as st
from shapes import ClassifierFirst
from torch import nn
from torch._dynamo.utils import counters

import opcomp

pytestmark = pytest.mark.compile

ELEMENTWISE = [
    "adamw(g)",
    "adam[b1=0.8](g) + 0.01 * p",
    "momentum[nesterov](g)",
    "rms(ema[debias](g))",
    "0.5 * adam(g) - 0.1 * sign(g)",
    "diag_fisher(momentum(g)) + 0.001 * p",
]


def params(shapes, seed: int) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]


@settings(max_examples=3, deadline=None)
@given(
    st.sampled_from(ELEMENTWISE),
    st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=3),
    st.integers(0, 2**16),
)
def test_compiled_and_eager_steps_agree(expression, shapes, seed):
    eager, compiled = params(shapes, seed), params(shapes, seed)
    optimizers = [
        opcomp.build(expression, eager, lr=1e-2, compile="off"),
        opcomp.build(expression, compiled, lr=1e-2, compile="on"),
    ]
    generator = torch.Generator().manual_seed(seed + 1)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=generator) for p in eager]
        for group, opt in zip((eager, compiled), optimizers):
            for p, g in zip(group, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fifty_steps_of_a_cosine_schedule_compile_no_more_graphs():
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = opcomp.build("lion", model, lr=1e-2, compile="on")  # adamw runs torch's fused kernel uncompiled
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)
    x, y = torch.randn(8, 16), torch.randn(8, 4)

    def step():
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        schedule.step()

    step()  # eager: creates the state
    step()  # compiles the steady graph
    counters.clear()
    for _ in range(48):
        step()
    assert counters["stats"]["unique_graphs"] == 0
    assert sum(counters["recompiles"].values()) == 0
    assert opt.param_groups[0]["lr"] < 1e-4  # the schedule did move the rate


def test_a_compiling_step_says_so_once_and_auto_leaves_the_cpu_eager(monkeypatch):
    from opcomp.step import compiled as execute

    compiles = []
    original = execute.compiled
    monkeypatch.setattr(execute, "compiled", lambda graph, programs: compiles.append(1) or original(graph, programs))
    model = nn.Sequential(nn.Linear(1000, 1000), nn.Linear(1000, 10))  # 1M parameters: still eager
    automatic = opcomp.build("lion", model, lr=1e-3)
    model(torch.randn(2, 1000)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no notice, no compile
        automatic.step()
    assert compiles == []

    small = nn.Linear(3, 2)
    forced = opcomp.build("lion", small, lr=1e-3, compile="on")
    small(torch.ones(1, 3)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        forced.step()  # the first step is eager: it makes the state the compiled graph keeps
    with pytest.warns(opcomp.OpcompNotice, match=r"compiling the fused step of lion.* over 2 tensors once, ~1 s"):
        forced.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        forced.step()  # the same graph: no second line
    assert compiles == [1]


@pytest.mark.parametrize("expression", ["f3eo", "adagnoema"])  # a second derivative; Gauss–Newton products
def test_second_order_probes_step_a_compiled_model_as_its_eager_original(expression):
    """Compiled graphs have no double backward: the training pass runs eagerly, and the build says so."""
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    original = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    original.load_state_dict(eager.state_dict())
    compiled = torch.compile(original)
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = opcomp.build(expression, compiled)
    announced = [str(w.message) for w in caught if issubclass(w.category, opcomp.OpcompWarning)]
    assert any("differentiates the loss twice, which torch.compile'd graphs cannot" in m for m in announced)
    reference = opcomp.build(expression, eager)
    for _ in range(2):
        loss = opt.step(lambda: nn.functional.cross_entropy(compiled(x), y))
        expected = reference.step(lambda: nn.functional.cross_entropy(eager(x), y))
        torch.testing.assert_close(loss, expected)
    for a, b in zip(original.parameters(), eager.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("expression", ["lion", "muon(g) | adamw", "adamw"])  # adamw: torch's fused kernel
def test_a_compiled_step_reads_nothing_back_from_the_device(expression):
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = opcomp.build(expression, model, lr=1e-2, compile="on")
    x, y = torch.randn(5, 8), torch.randn(5, 4)

    def step():
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    step()  # eager: creates the state
    step()  # compiles
    with counted_reads() as reads:
        for _ in range(5):
            step()
    assert reads == []
    assert opt.skipped_steps == 0


def test_a_warmed_up_optimizer_compiled_at_build_and_steps_as_one_that_did_not():
    torch._dynamo.reset()  # nothing compiled earlier in this process may stand in for the warm-up
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    before = [p.detach().clone() for p in models[0].parameters()]
    kept = torch.ones(3)
    models[0][2].bias.grad = kept  # a gradient the user had before the warm-up is theirs again after
    counters.clear()
    with pytest.warns(opcomp.OpcompNotice, match="compiling the fused step of lion"):
        warmed = opcomp.build("lion", models[0], lr=1e-2, compile="on", warmup=True)
    assert counters["stats"]["unique_graphs"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, models[0].parameters()))
    assert models[0][2].bias.grad is kept and models[0][0].weight.grad is None
    assert warmed.state_dict()["state"] == {} and warmed.skipped_steps == 0
    cold = opcomp.build("lion", models[1], lr=1e-2, compile="on")
    x, y = torch.randn(5, 6), torch.randn(5, 3)
    counters.clear()
    for _ in range(4):
        for model, opt in zip(models, (warmed, cold)):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    assert counters["stats"]["unique_graphs"] == 0  # the cold one's second step reused the warm-up's graph
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)


def test_a_warmup_that_cannot_compile_says_why():
    model = nn.Linear(3, 2)
    with pytest.raises(opcomp.OpcompError, match="compile='off' never compiles"):
        opcomp.build("adamw", model, compile="off", warmup=True)
    with pytest.warns(opcomp.OpcompNotice, match="compile='auto' steps eagerly on the CPU"):
        opcomp.build("adamw", model, warmup=True)
    with pytest.warns(opcomp.OpcompNotice, match="layer statistics, probes or rebound gradients step eagerly"):
        opcomp.build("kfac(g) | adamw", model, compile="on", warmup=True)
    with pytest.warns(opcomp.OpcompNotice, match="adamw.g. alone runs torch's fused AdamW kernel"):
        opcomp.build("adamw", model, compile="on", warmup=True)
    assert model.weight.grad is None


def test_the_compiled_finiteness_check_sees_every_non_finite_value_the_eager_one_does():
    """Inductor simplifies algebra (it folds ``t * 0`` to 0): the compiled flag must still read
    every element, of every floating dtype a step meets."""
    from opcomp.finite import flag as finite_flag

    compiled = torch.compile(finite_flag, fullgraph=True)
    dtypes = (torch.float32, torch.bfloat16, torch.float64, torch.float16)
    for bad in (float("nan"), float("inf"), -float("inf"), None):
        for where in range(len(dtypes)):
            tensors = [torch.randn(7, 33, dtype=dtype) for dtype in dtypes]
            tensors[where][3, 5] = torch.finfo(dtypes[where]).max if bad is None else bad
            assert bool(compiled(tensors)) == bool(finite_flag(tensors)) == (bad is None)


class TwoLayers(nn.Module):
    """A model class of the user's (compiled code is cached per class: forward's code object)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.head = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.hidden(x)))


@pytest.mark.parametrize("first", ["this model", "another instance"])
def test_a_model_compiled_and_run_before_the_build_feeds_fog_as_its_eager_twin(first):
    """Dynamo does not guard on hooks: code traced before opcomp's capture existed would run without
    it. The build clears that cache (and says so), and the compiled model then steps as its eager
    twin, to the rounding of the compiled forward."""
    torch.manual_seed(0)
    model, eager, other = TwoLayers(), TwoLayers(), TwoLayers()
    eager.load_state_dict(model.state_dict())
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    compiled = torch.compile(model)
    ran_first = compiled if first == "this model" else torch.compile(other)
    nn.functional.cross_entropy(ran_first(x), y).backward()
    model.zero_grad()
    with pytest.warns(opcomp.OpcompNotice, match="its cache is cleared, so the next compiled call traces again"):
        opt = opcomp.build("fog", model)
    reference = opcomp.build("fog", eager)
    for _ in range(3):
        for net, optimizer in ((compiled, opt), (eager, reference)):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
    assert opt.skipped_steps == 0
    for a, b in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_model_compiled_from_its_first_forward_keeps_the_guessed_head_and_a_late_eager_forward_says_so():
    """Compiled forwards do not settle the head (graph breaks would show some layers, not all); an
    eager forward after the optimizer has stepped says the plan stays, with the fix."""
    torch.manual_seed(0)
    model = ClassifierFirst()
    compiled = torch.compile(model)
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", opcomp.OpcompWarning)
        opt = opcomp.build("muon_adamw", model)
    guessed = opt.assignments()
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(compiled(x), y).backward()
        opt.step()
    assert opt.assignments() == guessed and guessed["body.2.weight"] == "0.1 × adamw"
    with pytest.warns(opcomp.OpcompWarning, match="has stepped already: its plan stays"):
        model(x)
    assert opt.assignments() == guessed
