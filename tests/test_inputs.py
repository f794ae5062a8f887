"""Input from the API and from files: each mistake is one OpcompError that names the place and
the fix (a TypeError or ValueError too, where Python code expects one), and reading stays cheap."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import opcomp
import opcomp.builder
import opcomp.rules


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


@pytest.mark.parametrize(
    ("call", "kind", "words"),
    [
        (lambda m: opcomp.build("adamw", None), TypeError, "opcomp.build takes a model"),
        (lambda m: opcomp.build("adamw", 5), TypeError, "got int"),
        (lambda m: opcomp.build("adamw", "weights"), TypeError, "got str"),
        (lambda m: opcomp.build("adamw", m, namespace=5), TypeError, "namespace is an opcomp Namespace"),
        (lambda m: opcomp.build("adamw", m, namespace={}), TypeError, "got dict"),
        (lambda m: opcomp.build("adamw", [m[0].weight * 2]), ValueError, "not a leaf tensor"),
        (lambda m: opcomp.build("adamw", [{"params": [m[0].weight]}, {"params": [m[0].weight]}]), ValueError, "twice"),
        (lambda m: opcomp.build("adamw", [m[0].weight, m[0].weight]), ValueError, "twice"),
        (lambda m: opcomp.build("adamw", [{"lr": 0.1}]), ValueError, "has no 'params'"),
        (lambda m: opcomp.build("adamw", m).add_param_group({"params": 5}), TypeError, "give a list of tensors"),
        (lambda m: opcomp.build("adamw", m).add_param_group([m[0].weight]), TypeError, "a param group is a dict"),
        (lambda m: opcomp.build("adamw", m, lr=10**400), ValueError, "finite number >= 0"),
        (lambda m: opcomp.build("adamw", m, lr="0.1"), TypeError, "finite number >= 0"),
        (lambda m: opcomp.build("adamw", [torch.zeros(2, dtype=torch.long)]), ValueError, "floating-point"),
    ],
)
def test_api_mistakes_are_opcomp_errors_of_the_kind_python_expects(call, kind, words):
    with pytest.raises(opcomp.OpcompError, match=words) as raised:
        call(model())
    assert isinstance(raised.value, kind)


def test_a_refused_param_group_leaves_the_optimizer_as_it_was():
    net = model()
    opt = opcomp.build("adamw", [net[0].weight])
    with pytest.raises(opcomp.OpcompError):
        opt.add_param_group({"params": [net[2].weight, net[0].weight]})
    assert len(opt.param_groups) == 1 and opt.explain().count("  lr=") == 1
    opt.add_param_group({"params": [net[2].weight]})
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("value", ["abc", "", "0x10", "0.1 # x", "-1", "0", "inf", "nan"])
def test_a_learning_rate_note_that_is_not_a_positive_number_is_refused_where_it_is_written(value):
    with pytest.raises(opcomp.OpcompError, match=r"is not a learning rate") as raised:
        opcomp.parse_definitions(f"# lr: {value}\nmine = adamw\n", "mine.opc")
    assert raised.value.span is not None and raised.value.line == 2


def test_a_learning_rate_note_that_is_a_number_is_the_recommended_lr():
    namespace = opcomp.parse_definitions("# lr: 2e-3\nmine = adamw\n", "mine.opc")
    assert opcomp.build("mine", model(), namespace=namespace).param_groups[0]["lr"] == 2e-3


@pytest.mark.parametrize(
    "text",
    [
        "x = " + "[" * 496 + "]" * 496 + "\n",
        "x = " + "{a = " * 330 + "1" + "}" * 330 + "\n[default]\nuse = 'adamw'\n",
        "x = " + "[" * 5000 + "]" * 5000 + "\n",
    ],
)
def test_deeply_nested_rule_files_are_opcomp_errors(tmp_path, text):
    """Whether tomllib's recursion runs out depends on the stack in use: either way the answer is
    an OpcompError (too deep, or not a rule file), never a RecursionError."""
    path = tmp_path / "deep.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(opcomp.OpcompError, match="too deeply|is missing|unknown key"):
        opcomp.build(str(path), model())


def test_a_missing_rule_file_in_a_folder_is_an_error_and_shipped_files_are_found_by_bare_name(tmp_path):
    with pytest.raises(opcomp.OpcompError, match="does not exist"):
        opcomp.build(str(tmp_path / "nonexist" / "adaptive.toml"), model())
    with pytest.raises(opcomp.OpcompError, match="does not exist"):
        opcomp.build("../../nonexist/adaptive.toml", model())
    assert opcomp.build("adaptive.toml", model()).rules()  # the shipped file, by its name


def test_ten_thousand_rules_read_each_distinct_use_once_and_check_a_parameter_against_few_rules(tmp_path, monkeypatch):
    """Reading is linear: an expression said by many rules is checked once, and a parameter's name
    is matched only against the rules whose glob can match it."""
    lines = [f'[[rule]]\nmatch = {{ name = "{i}.*" }}\nuse = "adamw[wd={i % 7}e-2]"\n' for i in range(10_000)]
    path = tmp_path / "many.toml"
    path.write_text("".join(lines) + '[[rule]]\nmatch = { ndim = 1 }\nuse = "g"\n[default]\nuse = "adamw"\n')
    checked, held = [], []
    real_checked, real_holds = opcomp.builder._checked, opcomp.rules.Match.holds
    monkeypatch.setattr(opcomp.builder, "_checked", lambda *a: checked.append(a[1]) or real_checked(*a))
    monkeypatch.setattr(opcomp.rules.Match, "holds", lambda self, *a: held.append(1) or real_holds(self, *a))
    net = nn.Sequential(*[nn.Linear(2, 2) for _ in range(12)])
    opt = opcomp.build(str(path), net)
    assert len(checked) == 9  # seven weight decays, 'g' and the default
    assert len(held) <= 4 * len(list(net.parameters()))
    assert opt.rules()["1.weight"] == "rule 2" and opt.rules()["11.weight"] == "rule 12"
    assert opt.rules()["3.bias"] == "rule 4" and opt.rules()["0.weight"] == "rule 1"
