"""What the build says about fallbacks: every ``|`` counts, nested ones included, each fallen-back
parameter is listed with its reason in ``opt.explain()``, and the names in those messages are
real (plain SGD is ``g``, an unsupported layer type is named as the cause)."""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from shapes import ClassifierFirst
from torch import nn
from torch.nn import functional as F

import opcomp


class Recurrent(nn.Module):
    """An LSTM body (no layer statistics for it) and a Linear head: 97% of it is the LSTM."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(16, 64, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def build_warnings(expression: str, model: nn.Module) -> tuple[opcomp.Optimizer, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = opcomp.build(expression, model)
    return opt, [str(w.message) for w in caught if issubclass(w.category, opcomp.OpcompWarning)]


@pytest.mark.parametrize(("preset", "statistic"), [("kfac_sgd", "kfac"), ("ekfac_sgd", "ekfac")])
def test_a_fallback_nested_inside_an_operator_is_reported_when_most_of_the_model_takes_it(preset, statistic):
    opt, said = build_warnings(preset, Recurrent())
    assert opt.assignments()["lstm.weight_ih_l0"] == "momentum"
    assert len(said) == 1, said
    assert f"the first branch ({statistic}) of the '|' inside momentum runs on 3% of the parameters" in said[0]
    assert "97% fell back to momentum" in said[0]
    assert "LSTM is a layer type opcomp has no statistics for" in said[0]


def test_a_fallback_most_of_the_model_does_not_take_is_not_reported():
    """An inner fallback past which only a norm's parameters fall says nothing."""
    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))
    opt, said = build_warnings("muon[hidden](g) | momentum(kfac(g) | g)", model)
    assert opt.assignments()["1.weight"] == "momentum" and opt.assignments()["4.weight"] == "momentum ← kfac"
    assert said == []


def test_plain_sgd_is_named_g_and_never_an_empty_name():
    opt, said = build_warnings("kfac(g) | g", Recurrent())
    assert opt.assignments()["lstm.weight_hh_l0"] == "g"
    assert "fell back to g:" in said[0]
    assert set(opcomp.build("sgd", nn.Linear(3, 2)).assignments().values()) == {"g"}
    assert set(opcomp.build("0.5 * g", nn.Linear(3, 2)).assignments().values()) == {"0.5 × g"}


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.conv = nn.Conv1d(8, 8, 3)
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)


def test_explain_lists_every_fallen_back_parameter_with_its_reason_and_names_unsupported_layer_types():
    opt = opcomp.build("fog", Mixed())
    rows = {line.split()[0]: line for line in opt.explain().splitlines() if line.startswith("  ") and "(" in line}
    assert "fell back" not in rows["hidden.weight"]
    assert "LSTM is a layer type opcomp has no statistics for" in rows["lstm.weight_ih_l0"]
    assert "Conv1d is a layer type opcomp has no statistics for" in rows["conv.weight"]
    assert "hidden layer's weight" not in rows["conv.weight"]
    assert "fell back: the output head's weight (muon needs a hidden layer's weight)" in rows["head.weight"]
    assert "fell back: 1-D parameters" in rows["hidden.bias"]


def twins():
    torch.manual_seed(0)
    model, reference = ClassifierFirst(32, 5), ClassifierFirst(32, 5, classifier_first=False)
    reference.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(1)
    return model, reference, torch.randn(64, 8, generator=generator), torch.randint(0, 5, (64,), generator=generator)


def steps(model, opt, x, y, count: int) -> None:
    for _ in range(count):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("preset", ["fog", "diagfog", "muon_adamw"])
def test_the_output_head_is_the_layer_that_produces_the_prediction_not_the_last_registered(preset):
    model, reference, x, y = twins()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", opcomp.OpcompWarning)
        opt, expected = opcomp.build(preset, model), opcomp.build(preset, reference)
    steps(model, opt, x, y, 3)
    steps(reference, expected, x, y, 3)
    runs = opt.assignments()
    assert runs["classifier.weight"] == "0.1 × adamw"
    assert runs["body.2.weight"] == runs["body.0.weight"] != "0.1 × adamw"
    assert runs == expected.assignments()
    assert "the output head's weight" in opt.explain().split("classifier.weight")[1].splitlines()[0]
    for a, b in zip(model.state_dict().values(), [reference.state_dict()[k] for k in model.state_dict()]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_a_state_loaded_before_the_first_forward_follows_the_settled_head_without_a_false_warning():
    model, reference, x, y = twins()
    opt = opcomp.build("fog", model)
    steps(model, opt, x, y, 2)
    saved = copy.deepcopy(opt.state_dict())
    resumed_model = ClassifierFirst(32, 5)
    resumed_model.load_state_dict(model.state_dict())
    resumed = opcomp.build("fog", resumed_model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", opcomp.OpcompWarning)
        resumed.load_state_dict(saved)
        steps(resumed_model, resumed, x, y, 2)
    steps(model, opt, x, y, 2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))


def test_rules_still_say_what_the_head_runs():
    model, _, x, y = twins()
    path = Path(tempfile.mkdtemp()) / "rules.toml"
    path.write_text(
        '[[rule]]\nmatch = { name = "classifier.weight" }\nuse = "muon(g)"\n[default]\nuse = "fog"\n', encoding="utf-8"
    )
    opt = opcomp.build(str(path), model)
    steps(model, opt, x, y, 1)
    assert opt.assignments()["classifier.weight"] == "muon"


def test_a_deep_copy_of_the_model_runs_without_touching_the_optimizer():
    """copy.deepcopy copies a module's hooks: an EMA copy of a model under fog carries the capture's
    and the head watch's hooks, which must leave the optimizer's records alone."""
    model, _, x, y = twins()
    opt = opcomp.build("fog", model)
    copied = copy.deepcopy(model)
    F.cross_entropy(copied(x), y).backward()  # before the model's own first forward
    steps(model, opt, x, y, 2)
    F.cross_entropy(copied(x), y).backward()
    steps(model, opt, x, y, 1)
    assert opt.assignments()["classifier.weight"] == "0.1 × adamw" and opt.skipped_steps == 0
