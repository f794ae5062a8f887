"""Per-layer rule files: matching, building, explaining, mistakes, and resume."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import opcomp
from opcomp.rules import Match, Rule, RuleFile, Rules, load


def write(tmp_path: Path, text: str, name: str = "rules.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 16),
        nn.LayerNorm(16),
        nn.Linear(16, 3),
    )


RULES = """
[[rule]]
match = { type = "Conv2d" }
use = "fog"

[[rule]]
match = { ndim = 1, name = "4.*" }   # the LayerNorm's weight and bias
use = "adamw"
lr_scale = 0.5
options = { wd = 0.0 }

[[rule]]
match = { type = "Linear", min_numel = 500 }
use = "muon(g) | adamw(g)"

[default]
use = "momentum[nesterov](g)"
"""


def test_first_matching_rule_wins_and_default_catches_the_rest(tmp_path):
    opt = opcomp.build(write(tmp_path, RULES), net(), lr=0.01)
    assert opt.rules() == {
        "0.weight": "rule 1", "0.bias": "rule 1",
        "3.weight": "rule 3", "3.bias": "default",
        "4.weight": "rule 2", "4.bias": "rule 2",
        "5.weight": "default", "5.bias": "default",
    }  # fmt: skip
    assert opt.assignments()["0.weight"] == "muon ← kfac" and opt.assignments()["0.bias"] == "0.1 × adamw"
    lrs = {group["rule"]: group["lr"] for group in opt.param_groups}
    assert lrs == {"rule 1": 0.01, "rule 2": 0.005, "rule 3": 0.01, "default": 0.01}
    expressions = {group["rule"]: group["expr"] for group in opt.param_groups}
    assert expressions["rule 2"] == "adamw[b1=0.9, b2=0.999, eps=1e-08, wd=0.0](g)"
    explained = opt.explain()
    assert "param group 1  lr=0.005  (rule 2)" in explained
    assert re.search(r"4\.weight\s+\(16,\)\s+adamw  \(rule 2\)", explained)


def test_without_an_lr_each_rule_takes_its_presets_recommendation(tmp_path):
    opt = opcomp.build(write(tmp_path, RULES), net())
    lrs = {group["rule"]: group["lr"] for group in opt.param_groups}
    assert lrs == {"rule 1": 0.03, "rule 2": 0.015, "rule 3": 0.03, "default": 0.1}  # fog, adamw × 0.5, muon, momentum


def test_the_shipped_adaptive_rules_follow_the_fog_note():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 1024),
        nn.ReLU(),
        nn.Linear(1024, 1024),
        nn.Linear(1024, 3),
    )
    opt = opcomp.build("adaptive.toml", model)  # found among opcomp's own presets
    assert opt.rules()["0.weight"] == "rule 1" and opt.rules()["4.weight"] == "rule 2"
    assert opt.assignments()["4.weight"] == "muon ← diag_kfac"
    assert opt.rules()["2.weight"] == opt.rules()["5.weight"] == "default"
    assert opt.assignments()["5.bias"] == "adamw"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[[rule]]\nmatch = { type = "Linear" }\nuse = "muon(kfca(g))"\n[default]\nuse = "adamw"',
         "rule 1, field 'use': unknown operator 'kfca' — did you mean 'kfac'?"),
        ('[[rule]]\nmatch = { type = "Linear" }\nuse = "adamw"\n', "[default] is missing"),
        ('[[rule]]\nmatch = { ndim = "two" }\nuse = "adamw"\n[default]\nuse = "adamw"',
         "rule 1, field 'match.ndim': must be a valid integer"),
        ('[[rule]]\nmatch = { type = "Linear" }\nuse = "adamw"\nlr_sclae = 2.0\n[default]\nuse = "adamw"',
         "rule 1, field 'lr_sclae': unknown key 'lr_sclae'"),
        ('[[rule]]\nmatch = { kind = "Linear" }\nuse = "adamw"\n[default]\nuse = "adamw"',
         "rule 1, field 'match.kind': unknown key 'kind'"),
        ('[[rule]]\nmatch = { type = "Linear" }\nuse = "adamw"\n[[rule]]\nmatch = { name = "blocks.[0-9" }\n'
         'use = "sgd"\n[default]\nuse = "adamw"',
         "rule 2, field 'match.name': malformed glob 'blocks.[0-9': '[' is never closed"),
        ('[default]\nuse = "adamw"\noptions = { wdd = 0.1 }', "[default], field 'options': unknown option 'wdd'"),
        ('[default]\nuse = "muon(g) | adamw"\noptions = { wd = 0.1 }', "[default], field 'options': options apply"),
        ('[[rule]\nuse = "adamw"', "is not valid TOML"),
    ],
)  # fmt: skip
def test_rule_file_mistakes_name_the_file_the_rule_and_the_field(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(opcomp.OpcompError) as caught:
        opcomp.build(path, net())
    message = str(caught.value)
    assert path in message and words in message


def test_a_rule_file_needs_the_model(tmp_path):
    with pytest.raises(opcomp.OpcompError, match="build it with the model"):
        opcomp.build(write(tmp_path, RULES), list(net().parameters()))


def test_different_layers_train_with_different_expressions_and_resume_exactly(tmp_path):
    path = write(tmp_path, RULES)
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(8, 1, 6, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator))
        for _ in range(12)
    ]

    def run(model, opt, data):
        for x, y in data:
            opt.step(lambda: F.cross_entropy(model(x), y))  # noqa: B023 - evaluated within the iteration

    straight = net()
    run(straight, opcomp.build(path, straight, lr=0.01), batches)
    first = net()
    opt = opcomp.build(path, first, lr=0.01)
    run(first, opt, batches[:6])
    saved = opt.state_dict()
    resumed = net()
    resumed.load_state_dict(first.state_dict())
    opt = opcomp.build(path, resumed, lr=0.01)
    opt.load_state_dict(saved)
    run(resumed, opt, batches[6:])
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(straight.parameters(), net().parameters()))


# -- the matcher against a naive one ---------------------------------------------------------------


def naive_glob(pattern: str, name: str) -> bool:
    """'*' any run of characters, '?' one character, everything else literal."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, name, flags=re.S) is not None


def naive_assign(rules: list[dict], name: str, param: torch.Tensor, module: nn.Module) -> str:
    for number, rule in enumerate(rules, 1):
        types = rule.get("type")
        types = [types] if isinstance(types, str) else types
        conditions = [
            types is None or module.__class__.__name__ in types,
            "name" not in rule or naive_glob(rule["name"], name),
            "ndim" not in rule or len(param.shape) == rule["ndim"],
            "min_numel" not in rule or param.numel() >= rule["min_numel"],
            "max_numel" not in rule or param.numel() <= rule["max_numel"],
            "shape" not in rule or tuple(param.shape) == tuple(rule["shape"]),
        ]
        if all(conditions):
            return f"rule {number}"
    return "default"


layers = st.one_of(
    st.builds(lambda a, b, bias: nn.Linear(a, b, bias=bias), st.integers(1, 6), st.integers(1, 6), st.booleans()),
    st.builds(lambda a, b, k: nn.Conv2d(a, b, k), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
    st.builds(nn.LayerNorm, st.integers(1, 6)),
    st.builds(nn.Embedding, st.integers(2, 6), st.integers(1, 4)),
)
trees = st.recursive(
    layers, lambda inner: st.lists(inner, min_size=1, max_size=3).map(lambda ms: nn.Sequential(*ms)), max_leaves=6
)
globs = st.lists(st.sampled_from(["*", "?", "0", "1", ".", "weight", "bias", "2"]), min_size=1, max_size=4).map("".join)


def matches(sizes: list[int], shapes: list[list[int]]):
    """Match tables whose bounds and shapes come from the model's own parameters, so edges are hit."""
    near = st.one_of(
        st.sampled_from(sorted(set(sizes))),
        st.sampled_from(sorted({n + d for n in sizes for d in (-1, 1) if n + d >= 0})),
    )
    altered = [shape[:1] + [size + 1 for size in shape[1:]] or [shape[0] + 1] for shape in shapes]
    return st.fixed_dictionaries(
        {},
        optional={
            "type": st.one_of(
                st.sampled_from(["Linear", "Conv2d", "LayerNorm", "Embedding"]), st.just(["Linear", "Conv2d"])
            ),
            "name": globs,
            "ndim": st.integers(1, 4),
            "min_numel": near,
            "max_numel": near,
            "shape": st.sampled_from(shapes + altered),
        },
    )


@settings(max_examples=400)
@given(trees, st.data())
def test_the_matcher_agrees_with_a_naive_matcher(model, data):
    model = model if isinstance(model, nn.Sequential) else nn.Sequential(model)
    params = list(model.parameters())
    rule_list = data.draw(st.lists(matches([p.numel() for p in params], [list(p.shape) for p in params]), max_size=4))
    rules = Rules(
        "generated.toml", RuleFile(rule=[Rule(match=Match(**m), use="adamw") for m in rule_list], default={"use": "g"})
    )
    owners = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    for name, param in model.named_parameters():
        module = owners[id(param)]
        assert rules.assign(name, param, module).label == naive_assign(rule_list, name, param, module), name


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("blocks.*.attn.*", "blocks.0.attn.query.weight", True),
        ("blocks.*.attn.*", "blocks.0.mlp.up.weight", False),
        ("*.bias", "head.bias", True),
        ("*.bias", "head.Bias", False),  # case matters
        ("layer?.weight", "layer1.weight", True),
        ("layer?.weight", "layer12.weight", False),
        ("blocks.[01].*", "blocks.1.norm.weight", True),
        ("blocks.[01].*", "blocks.2.norm.weight", False),
    ],
)
def test_name_globs(pattern, name, matches):
    assert Match(name=pattern).holds(name, torch.zeros(1), None) is matches


def test_loading_checks_the_schema_before_anything_is_built(tmp_path):
    rules = load(write(tmp_path, RULES))
    assert [r.use for r in rules.file.rule] == ["fog", "adamw", "muon(g) | adamw(g)"]
    assert rules.file.default.use == "momentum[nesterov](g)"


def test_a_rule_that_sends_only_biases_to_kfac_preconditions_each_bias_alone(tmp_path):
    """{ndim = 1} → kfac(g): every bias runs KFAC without its weight, X = ∇b and A = [1]."""
    rules = write(tmp_path, '[[rule]]\nmatch = { ndim = 1 }\nuse = "kfac[damping=0.01](g)"\n[default]\nuse = "sgd"\n')
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    opt = opcomp.build(rules, model, lr=1.0)
    assert opt.assignments() == {"0.weight": "g", "0.bias": "kfac", "2.weight": "g", "2.bias": "kfac"}
    hidden = torch.tanh(model[0](x)).detach()
    # the last layer's per-example bias gradients, written out: softmax − onehot
    examples = torch.softmax(model[2](hidden), 1).detach() - F.one_hot(y, 3)
    g = examples.T @ examples / 12
    pi = (1.0 / (g.trace() / 3)).sqrt()
    lambda_a, lambda_g = pi * 0.1, 0.1 / pi
    before = model[2].bias.detach().clone()
    F.cross_entropy(model(x), y).backward()
    expected = torch.linalg.solve(g + lambda_g * torch.eye(3), model[2].bias.grad) / (1 + lambda_a)
    opt.step()
    torch.testing.assert_close(before - model[2].bias.detach(), expected, rtol=1e-4, atol=1e-6)
