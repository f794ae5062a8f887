"""What the build says about fallbacks: every ``|`` counts, nested ones included, each fallen-back
parameter is listed with its reason in ``opt.explain()``, and the names in those messages are
real (plain SGD is ``g``, an unsupported layer type is named as the cause)."""

from __future__ import annotations

import warnings

import pytest
from torch import nn

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
