"""The capture inside a compiled model: one graph, no recompiles, and the statistics eager records.

``aot_eager`` runs the traced graph op by op, as eager does, so a compiled model's steps must
equal its eager twin's bit for bit: any record lost, doubled or misplaced by the custom ops
(:mod:`opcomp.capture_ops`) changes the factors and so the parameters.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.utils.checkpoint
from shapes import ClassifierFirst
from torch import nn
from torch._dynamo.utils import counters
from torch.nn import functional as F

import opcomp
from opcomp.comparison import models

pytestmark = pytest.mark.compile

TOGGLING = "muon[hidden](kfac[update_every=2](g)) | 0.1 * adamw"  # armed every other step


class StridedConvNet(nn.Module):
    """A strided convolution, a 1×1 one run twice (two records in one forward) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.mix = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.mix(torch.relu(self.mix(torch.relu(self.stem(x))))))
        return self.head(x.mean((2, 3)))


class CheckpointedMLP(nn.Module):
    """A hidden block recomputed in the backward (torch.utils.checkpoint, non-reentrant)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False))


def case(kind: str):
    """A model and two micro-batches with their loss."""
    generator = torch.Generator().manual_seed(1)
    if kind == "transformer":
        tokens = torch.randint(0, 11, (2, 4, 9), generator=generator)
        model = models.CharTransformer(11, width=16, heads=2, depth=1, length=8)
        batches = [(t[:, :-1], t[:, 1:]) for t in tokens]
        return model, batches, lambda out, y: F.cross_entropy(out.reshape(-1, 11), y.reshape(-1))
    if kind == "conv":
        model, shape, classes = StridedConvNet(), (6, 3, 8, 8), 5
    elif kind == "checkpointed":
        model, shape, classes = CheckpointedMLP(), (6, 12), 4
    else:
        model, shape, classes = models.mlp(12, 16, 4), (6, 12), 4
    batches = [(torch.randn(shape, generator=generator), torch.randint(0, classes, (6,), generator=generator))] * 2
    batches[1] = (batches[1][0] * 0.5, batches[1][1].flip(0))
    return model, batches, F.cross_entropy


def train(model, run, opt, batches, loss, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        for x, y in batches:  # an accumulated step: two forwards of the model, two records per layer
            (loss(run(x), y) / len(batches)).backward()
        opt.step()


@pytest.mark.parametrize(
    "kind, expression",
    [("mlp", "fog"), ("conv", "fog"), ("transformer", "fog"), ("checkpointed", "fog"), ("mlp", TOGGLING)],
)
def test_a_compiled_model_traces_the_capture_whole_and_steps_as_its_eager_twin(kind, expression):
    torch.manual_seed(0)
    model, batches, loss = case(kind)
    twin = copy.deepcopy(model)
    torch._dynamo.reset()
    counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", opcomp.OpcompWarning)
        compiled_opt, eager_opt = opcomp.build(expression, model), opcomp.build(expression, twin)
    compiled = torch.compile(model, backend="aot_eager")
    train(model, compiled, compiled_opt, batches, loss, 4)
    train(twin, twin, eager_opt, batches, loss, 4)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert sum(counters["recompiles"].values()) == 0, "arming the capture recompiled the model"
    assert compiled_opt.skipped_steps == 0
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name


def test_a_capture_that_samples_labels_breaks_the_graph_and_says_so():
    """fisher=mc's extra backward cannot run inside a compiled graph: the eager hooks run between
    graphs, as they did, and the notice says what that costs and the traceable alternative."""
    torch.manual_seed(0)
    model, batches, loss = case("mlp")
    twin = copy.deepcopy(model)
    torch._dynamo.reset()
    expression = "muon[hidden](kfac[fisher=mc](g)) | 0.1 * adamw"
    compiled_opt = opcomp.build(expression, model, likelihood="categorical")
    eager_opt = opcomp.build(expression, twin, likelihood="categorical")
    compiled = torch.compile(model, backend="aot_eager")
    with pytest.warns(opcomp.OpcompNotice, match="fisher=mc .* breaks its graph at every captured layer"):
        torch.manual_seed(5)
        train(model, compiled, compiled_opt, batches, loss, 2)
    torch.manual_seed(5)
    train(twin, twin, eager_opt, batches, loss, 2)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)


def test_a_layer_hooked_when_the_head_settles_is_recorded_by_code_compiled_before():
    """A compiled forward, then the model's first eager forward settles the head and hooks a layer
    the guess had left out: the compiled code traced before must not run on without its hook."""
    torch.manual_seed(0)
    model = ClassifierFirst()
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 8), torch.randint(0, 4, (8,))
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", opcomp.OpcompWarning)
        compiled_opt, eager_opt = opcomp.build("fog", model), opcomp.build("fog", twin)
        compiled = torch.compile(model, backend="aot_eager")
        compiled(x)  # traced while body.2 is guessed to be the head, so not captured
        model(x)  # settles the head: body.2 is hidden after all, and hooked
        twin(x)
    for _ in range(3):
        for run, opt in ((compiled, compiled_opt), (twin, eager_opt)):
            opt.zero_grad()
            F.cross_entropy(run(x), y).backward()
            opt.step()
    assert compiled_opt.assignments()["body.2.weight"] == eager_opt.assignments()["body.2.weight"] != "0.1 × adamw"
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name
