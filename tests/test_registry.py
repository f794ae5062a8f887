"""The registry against the operator catalogue, and the generated catalogue against docs/operators.md."""

from __future__ import annotations

from pathlib import Path

import pytest

import opcomp
from opcomp.catalogue import catalogue_markdown
from opcomp.ops import REGISTRY, Applies, Kind

# The operator catalogue, written out independently of the registry.
DESIGN_CATALOGUE = {
    Kind.SOURCE: ["g", "p", "grad_at"],
    Kind.TEMPORAL: ["ema", "momentum"],
    Kind.STATISTICAL: ["adam", "adamw", "rms", "diag_fisher", "kfac", "diag_kfac", "ekfac", "diag_hessian"],
    Kind.STRUCTURAL: ["orth", "muon", "sign", "normalize", "clip", "clip_global", "reject", "project", "adarmsuon"],
    Kind.PROBE: ["hvp", "gnvp", "sam", "lgn", "zo"],
}

DESIGN_DEFAULTS = {
    "adam": {"b1": 0.9, "b2": 0.999, "eps": 1e-8},
    "adamw": {"b1": 0.9, "b2": 0.999, "eps": 1e-8, "wd": 0.01},
    "orth": {"steps": 5},
    "muon": {"beta": 0.95, "nesterov": True, "steps": 5},
    "diag_fisher": {"beta": 0.95},
    "kfac": {"decay": 0.95, "damping": 1e-3, "invert_every": 10, "damping_mode": "factored", "fisher": "empirical"},
    "grad_at": {"rho": 0.05},
    "sam": {"rho": 0.05, "mode": "plain"},
    "lgn": {"solver": "cg", "steps": 5, "damping": 1e-4},
    "zo": {"eps": 1e-3, "dist": "rademacher", "relative": False, "newton": False},
}


def test_every_design_operator_is_registered_with_its_kind():
    for kind, names in DESIGN_CATALOGUE.items():
        for name in names:
            assert REGISTRY.get(name) is not None, name
            assert REGISTRY[name].kind is kind, name
    assert REGISTRY.get("adarms") is REGISTRY["adam"]
    assert REGISTRY.get("grad") is REGISTRY["g"] and REGISTRY.get("param") is REGISTRY["p"]


@pytest.mark.parametrize("name", sorted(DESIGN_DEFAULTS))
def test_defaults_are_the_designs(name):
    options = REGISTRY[name].options()
    for key, value in DESIGN_DEFAULTS[name].items():
        assert getattr(options, key) == value, (name, key)


def test_arity_applicability_requirements_and_state():
    assert REGISTRY["reject"].params == ("x", "y") and REGISTRY["project"].arity == 2
    assert REGISTRY["g"].arity == 0 and REGISTRY["zo"].arity == 0
    assert {s.name for s in REGISTRY if s.applies is Applies.MATRIX} == {"orth", "muon", "adarmsuon"}
    assert {s.name for s in REGISTRY if s.applies is Applies.LAYER} == {"kfac", "diag_kfac", "ekfac"}
    assert {s.name for s in REGISTRY if s.needs.closure} >= {"grad_at", "hvp", "gnvp", "sam", "lgn", "zo"}
    assert [b.name for b in REGISTRY["adam"].state] == ["exp_avg", "exp_avg_sq", "step"]
    assert [b.shape for b in REGISTRY["kfac"].state[:2]] == ["in_factor", "out_factor"]
    assert REGISTRY["sam"].binds_gradient and not any(s.binds_gradient for s in REGISTRY if s.name != "sam")


def test_every_operator_is_documented():
    for spec in REGISTRY:
        assert spec.summary and spec.formula, spec.name
        for name, field in spec.option_fields().items():
            assert field.description, (spec.name, name)


def test_combinators_are_written_with_symbols_not_called():
    for name in ("sum", "scale", "fallback"):
        assert REGISTRY.get(name) is None
        with pytest.raises(opcomp.UnknownNameError):
            opcomp.format(f"{name}(g)")


def test_docs_catalogue_is_generated_from_the_registry():
    from opcomp.kernels import load

    committed = (Path(__file__).parents[1] / "docs" / "operators.md").read_text(encoding="utf-8")
    generated = catalogue_markdown({name: kernel.__module__ for name, kernel in load().items()})
    assert committed == generated, "regenerate: opcomp operators --markdown > docs/operators.md"


def test_the_catalogue_names_the_files_that_hold_each_spec_and_kernel():
    from opcomp.catalogue import spec_file
    from opcomp.kernels import load

    root = Path(__file__).parents[1]
    for spec in REGISTRY:
        assert f'name="{spec.name}"' in (root / spec_file(spec)).read_text(encoding="utf-8"), spec.name
    for name, kernel in load().items():
        assert (root / (kernel.__module__.replace(".", "/") + ".py")).is_file(), name


def test_every_callable_operator_has_a_kernel():
    from opcomp.kernels import load

    kernels = load()
    missing = [spec.name for spec in REGISTRY if spec.callable and spec.name not in kernels]
    assert not missing
    assert {"sum", "scale"} <= set(kernels)  # fallback is resolved per parameter at build time
