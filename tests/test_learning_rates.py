"""The recommended learning rate depends on what the model is: Adam-scaled updates take a smaller
rate on transformers and on convolutional networks of a million parameters or more, SGD and
momentum a smaller one on the latter (docs/presets.md measures them), and the build, rule files
and comparisons all pick the same one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import opcomp
from opcomp.learning_rates import (
    DEFAULT,
    KINDS,
    LARGE_CNN,
    LARGE_CNN_PARAMETERS,
    TRANSFORMER,
    model_kind,
    recommended_lr,
)
from opcomp.ops import REGISTRY


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, 11)

    def forward(self, tokens):
        return self.head(torch.relu(self.hidden(self.embed(tokens))))


class SelfAttention(nn.Module):  # named as Hugging Face names theirs
    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(8, 8)

    def forward(self, x):
        return self.mix(x)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def conv_net(hidden: int) -> nn.Module:
    """A convolution on 8×8 images and a linear layer of ``hidden`` units: 288·hidden parameters and a few."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, hidden), nn.ReLU(), nn.Linear(hidden, 1)
    )


def size(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_the_kind_of_model_is_read_from_its_modules():
    assert model_kind(TokenModel()) == TRANSFORMER
    assert model_kind(nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2))) == TRANSFORMER
    assert model_kind(nn.Sequential(SelfAttention(), nn.Linear(8, 3))) == TRANSFORMER
    assert model_kind(mlp()) == DEFAULT
    assert model_kind(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))) == DEFAULT
    assert model_kind(None) == DEFAULT


def test_a_convolutional_network_is_large_from_a_million_parameters():
    below, above = conv_net(3400), conv_net(3500)
    assert size(below) < LARGE_CNN_PARAMETERS <= size(above)
    assert (model_kind(below), model_kind(above)) == (DEFAULT, LARGE_CNN)
    wide_mlp = nn.Sequential(nn.Flatten(), nn.Linear(288, 3500), nn.ReLU(), nn.Linear(3500, 1))
    assert size(wide_mlp) > LARGE_CNN_PARAMETERS and model_kind(wide_mlp) == DEFAULT  # no convolutions
    attending = nn.Sequential(conv_net(3500), nn.MultiheadAttention(1, 1))
    assert model_kind(attending) == TRANSFORMER  # attention decides first


@pytest.mark.parametrize(
    ("expr", "default", "transformer", "large_cnn"),
    [
        ("adamw", 0.03, 0.003, 0.003),
        ("adam", 0.03, 0.003, 0.003),
        ("soap", 0.01, 0.005, 0.01),  # not measured on a large CNN: its default rate
        ("adafactor", 0.03, 0.003, 0.003),
        ("ds_shampoo", 0.03, 0.003, 0.03),
        ("kfac_graft", 0.01, 0.003, 0.01),
        ("graft(muon(g), adamw(g)) | adamw(g)", 0.03, 0.003, 0.003),  # a graft takes its second argument's scale
        ("fog", 0.03, 0.03, 0.03),  # Muon's scale: the same on all three
        ("muon_adamw", 0.03, 0.03, 0.03),
        ("sgd", 0.3, 0.3, 0.1),
        ("g", 0.3, 0.3, 0.1),  # the sgd preset's body
        ("sam", 0.3, 0.3, 0.1),  # sam alone steps along the gradient
        ("momentum", 0.1, 0.1, 0.03),
        ("lion", 0.003, 0.003, 0.0003),
    ],
)
def test_the_build_takes_the_rate_for_the_kind_of_model(expr, default, transformer, large_cnn, large_conv_net):
    assert opcomp.build(expr, mlp()).param_groups[0]["lr"] == default
    assert opcomp.build(expr, TokenModel()).param_groups[0]["lr"] == transformer
    assert opcomp.build(expr, large_conv_net).param_groups[0]["lr"] == large_cnn
    assert opcomp.build(expr, TokenModel(), lr=0.5).param_groups[0]["lr"] == 0.5  # a given lr is kept


@pytest.fixture(scope="module")
def large_conv_net() -> nn.Module:
    return conv_net(3500)


def test_a_parameter_list_says_nothing_of_its_model_and_takes_the_default_rate():
    assert opcomp.build("adamw", list(TokenModel().parameters())).param_groups[0]["lr"] == 0.03


def test_every_operator_rate_for_a_kind_of_model_is_below_its_default_rate():
    """A kind's rate is the smaller scale of the same update; one without a default, or for a kind
    model_kind never returns, is a typo."""
    specs = [spec for spec in REGISTRY.specs.values() if spec.kind_lrs]
    assert {spec.name for spec in specs} >= {"adam", "adamw", "soap", "adafactor", "momentum", "lion"}
    for spec in specs:
        assert set(spec.kind_lrs) <= set(KINDS) - {DEFAULT}, spec.name
        assert spec.lr is not None and all(0 < lr < spec.lr for lr in spec.kind_lrs.values()), spec.name


def test_a_definition_note_may_carry_a_transformer_rate():
    namespace = opcomp.parse_definitions("# lr: 0.02\n# lr_transformer: 0.002\nmine = adamw\n", "mine.opc")
    assert recommended_lr("mine", namespace) == 0.02
    assert recommended_lr("mine", namespace, TRANSFORMER) == 0.002
    assert opcomp.build("mine", TokenModel(), namespace=namespace).param_groups[0]["lr"] == 0.002
    plain = opcomp.parse_definitions("# lr: 0.02\nmine = adamw\n", "mine.opc")
    assert recommended_lr("mine", plain, TRANSFORMER) == 0.02  # without one, # lr: serves every model
    with pytest.raises(opcomp.OpcompError, match="lr_transformer: fast.*not a learning rate"):
        opcomp.parse_definitions("# lr: 0.02\n# lr_transformer: fast\nmine = adamw\n", "mine.opc")


def test_a_definition_note_may_carry_a_rate_for_large_cnns(large_conv_net):
    namespace = opcomp.parse_definitions("# lr: 0.02\n# lr_large_cnn: 0.004\nmine = adamw\n", "mine.opc")
    assert recommended_lr("mine", namespace, LARGE_CNN) == 0.004
    assert recommended_lr("mine", namespace, TRANSFORMER) == 0.02
    assert opcomp.build("mine", large_conv_net, namespace=namespace).param_groups[0]["lr"] == 0.004
    with pytest.raises(opcomp.OpcompError, match="lr_large_cnn: -1.*not a learning rate"):
        opcomp.parse_definitions("# lr: 0.02\n# lr_large_cnn: -1\nmine = adamw\n", "mine.opc")


def test_a_rule_file_takes_each_rules_rate_for_the_kind_of_model(tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text("[[rule]]\nmatch = { name = 'hidden.weight' }\nuse = 'muon(g)'\n\n[default]\nuse = 'adamw'\n")
    groups = {g["rule"]: g["lr"] for g in opcomp.build(str(rules), TokenModel()).param_groups}
    assert groups == {"rule 1": 0.03, "default": 0.003}


def test_compare_starts_each_expression_at_its_rate_for_the_tasks_model_and_says_so():
    comparison = opcomp.compare(["adamw", "muon_adamw"], task="pydoc", steps=2)
    assert {r.optimizer: r.lr for r in comparison.runs} == {"adamw": 0.003, "muon_adamw": 0.03}
    assert comparison.kind == TRANSFORMER
    from opcomp.comparison.report import markdown

    assert "its transformer rates" in markdown(comparison, [])


def test_compare_on_resnet18_takes_the_rates_for_large_cnns_and_says_so():
    from opcomp.comparison.report import markdown

    comparison = opcomp.compare(["adamw", "sgd", "muon_adamw"], task="resnet18", steps=1)
    assert {r.optimizer: r.lr for r in comparison.runs} == {"adamw": 0.003, "sgd": 0.1, "muon_adamw": 0.03}
    assert comparison.kind == LARGE_CNN
    assert "its rates for large CNNs: the model has convolutions and 1,000,000 parameters or more" in markdown(
        comparison, []
    )


def test_the_lr_check_decides_a_flagged_row_on_the_mean_over_three_seeds():
    from opcomp.bench.lr_check import UNFAIR, line, summary, worse

    row = {"entry": "adamw", "task": "digits", "recommended": 0.03, "tuned": 0.01, "tried": [[0.01, 1.0], [0.03, 1.2]]}
    assert worse(row) == pytest.approx(0.2) and worse(row) > UNFAIR and "**> 10%**" in line(row)
    assert summary([row], ["adamw", "soap"], ["digits", "mnist"])[2:] == [
        "| adamw | **0.03 → 0.01, +20%** | — |",
        "| soap | — | — |",
    ]
    row["seeds"] = [[0.03, [1.0, 1.1]], [0.01, [1.1, 1.2]]]  # seeds 1 and 2 favour the recommended lr
    assert worse(row) == pytest.approx(1.1 / 1.1 - 1) and "> 10%" not in line(row) and "(3 seeds)" in line(row)
    assert summary([row], ["adamw"], ["digits"])[2] == "| adamw | 0.03 → 0.01, +0%³ |"
    diverged = {**row, "tried": [[0.01, 1.0], [0.03, float("inf")]], "seeds": []}
    assert worse(diverged) == float("inf")
    tuned_diverged = {**row, "seeds": [[0.03, [1.0, 1.1]], [0.01, [float("inf"), 1.2]]]}
    assert worse(tuned_diverged) == -float("inf") and "the tuned lr diverged on another seed" in line(tuned_diverged)


def test_the_cnn_rates_table_means_each_cell_over_its_seeds_and_says_when_some_are_missing():
    from opcomp.bench.cnn_rates import table

    results = [
        ["cnn-bn", "adamw", 0.03, 0, 0.1],
        ["cnn-bn", "adamw", 0.03, 1, 0.3],
        ["cnn-bn", "sgd", 0.3, 0, 0.5],
        ["cnn-bn", "sgd", 0.3, 7, 9.0],  # a seed not asked for
    ]
    lines = table(results, ["cnn-bn"], ["adamw:0.03", "sgd:0.3", "sgd:0.1"], [0, 1])
    assert lines[0] == "| network | parameters | convolutions | adamw:0.03 | sgd:0.3 | sgd:0.1 |"
    assert lines[2] == "| the small CNN with batch norm | 0.01M | 2 | 0.200 | 0.500 (1 of 2 seeds) | — |"


def test_a_note_takes_a_rate_field_for_every_kind_of_model():
    """definitions.RATE_FIELDS spells the kinds out (learning_rates imports definitions): kept in step here."""
    from opcomp.definitions import RATE_FIELDS

    assert RATE_FIELDS == ("lr", *(f"lr_{kind}" for kind in KINDS if kind != DEFAULT))
