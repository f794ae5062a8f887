"""The recommended learning rate depends on what the model is: Adam-scaled updates take a smaller
rate on transformers (docs/presets.md measures both), and the build, rule files and comparisons
all pick the same one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import opcomp
from opcomp.learning_rates import DEFAULT, TRANSFORMER, model_kind, recommended_lr
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


def test_the_kind_of_model_is_read_from_its_modules():
    assert model_kind(TokenModel()) == TRANSFORMER
    assert model_kind(nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2))) == TRANSFORMER
    assert model_kind(nn.Sequential(SelfAttention(), nn.Linear(8, 3))) == TRANSFORMER
    assert model_kind(mlp()) == DEFAULT
    assert model_kind(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))) == DEFAULT
    assert model_kind(None) == DEFAULT


@pytest.mark.parametrize(
    ("expr", "default", "transformer"),
    [
        ("adamw", 0.03, 0.003),
        ("adam", 0.03, 0.003),
        ("soap", 0.01, 0.005),
        ("adafactor", 0.03, 0.003),
        ("ds_shampoo", 0.03, 0.003),
        ("kfac_graft", 0.01, 0.003),
        ("graft(muon(g), adamw(g)) | adamw(g)", 0.03, 0.003),  # a graft takes its second argument's scale
        ("fog", 0.03, 0.03),  # Muon's scale: the same on both
        ("muon_adamw", 0.03, 0.03),
        ("sgd", 0.3, 0.3),
    ],
)
def test_the_build_takes_the_rate_for_the_kind_of_model(expr, default, transformer):
    assert opcomp.build(expr, mlp()).param_groups[0]["lr"] == default
    assert opcomp.build(expr, TokenModel()).param_groups[0]["lr"] == transformer
    assert opcomp.build(expr, TokenModel(), lr=0.5).param_groups[0]["lr"] == 0.5  # a given lr is kept


def test_a_parameter_list_says_nothing_of_its_model_and_takes_the_default_rate():
    assert opcomp.build("adamw", list(TokenModel().parameters())).param_groups[0]["lr"] == 0.03


def test_every_operator_with_a_transformer_rate_has_a_default_rate_above_it():
    """A transformer rate is the smaller scale of the same update; one without a default is a typo."""
    specs = [spec for spec in REGISTRY.specs.values() if spec.transformer_lr is not None]
    assert {spec.name for spec in specs} >= {"adam", "adamw", "soap", "adafactor"}
    assert all(spec.lr is not None and 0 < spec.transformer_lr < spec.lr for spec in specs)


def test_a_definition_note_may_carry_a_transformer_rate():
    namespace = opcomp.parse_definitions("# lr: 0.02\n# lr_transformer: 0.002\nmine = adamw\n", "mine.opc")
    assert recommended_lr("mine", namespace) == 0.02
    assert recommended_lr("mine", namespace, TRANSFORMER) == 0.002
    assert opcomp.build("mine", TokenModel(), namespace=namespace).param_groups[0]["lr"] == 0.002
    plain = opcomp.parse_definitions("# lr: 0.02\nmine = adamw\n", "mine.opc")
    assert recommended_lr("mine", plain, TRANSFORMER) == 0.02  # without one, # lr: serves every model
    with pytest.raises(opcomp.OpcompError, match="lr_transformer: fast.*not a learning rate"):
        opcomp.parse_definitions("# lr: 0.02\n# lr_transformer: fast\nmine = adamw\n", "mine.opc")


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
