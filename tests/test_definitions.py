"""Definition files and presets."""

from __future__ import annotations

import pytest

import opcomp
from opcomp.definitions import EMPTY

# docs/presets.md's table and departures from the notes: Muon and AdaRMSuon take hidden layers only, and
# fog, diagfog and muon_adamw give their AdamW branch its own step (a tenth of the lr by default);
# f3eo clips its meta-gradient 2·H·g as the authors' code does, and adagnoema's inner Adam takes
# steps of 0.01 (docs/presets.md)
DESIGN_PRESETS = {
    "fog": "muon[hidden](kfac(g)) | 0.1 * adamw(g)",
    "diagfog": "muon[hidden](diag_kfac(g)) | 0.1 * adamw(g)",
    "f3eo": "adamw(g + reject(clip_global[max_norm=0.1](2 * hvp(g)), g))",
    "fs_adarmsuon": "sam[fisher](adarmsuon[hidden] | adamw)",
    "adagnoema": "lgn[solver=adam, steps=5, inner_lr=0.01](g)",
    "sgd": "g",
    "muon_adamw": "muon[hidden](g) | 0.1 * adamw(g)",
    "kfac_sgd": "momentum(kfac(g) | g)",
    "ekfac_sgd": "momentum(ekfac(g) | g)",
    "sam_sgd": "sam[rho=0.05](momentum(g))",
    "asam_sgd": "sam[adaptive, rho=0.5](momentum(g))",
    "pi_muon": "0.5 * kfac(g) + 0.5 * muon[hidden](g) | adamw(g)",
    "mezo": "zo",
    "awzo": "zo[relative, newton, eps=0.03]",
}


def test_every_preset_of_the_design_ships_and_means_what_the_design_says():
    assert set(DESIGN_PRESETS) <= set(opcomp.presets().names())
    for name, meaning in DESIGN_PRESETS.items():
        assert opcomp.lower(name) == opcomp.lower(meaning, EMPTY), name


def test_definitions_with_options_substitute_into_numbers_and_option_values():
    namespace = opcomp.parse_definitions(
        """
        # a comment
        blend[lam=0.25, r=0.1] = (1 - lam) * adam
                               + lam * sam[rho=r](g)
        strong = blend[lam=0.5, r=2 * 0.1]
        """,
        "mine.opc",
    )
    assert opcomp.format("blend", namespace) == opcomp.format("0.75 * adam + 0.25 * sam[rho=0.1](g)")
    assert opcomp.format("strong", namespace) == opcomp.format("0.5 * adam + 0.5 * sam[rho=0.2](g)")


def test_bool_and_word_options_of_definitions():
    namespace = opcomp.parse_definitions("m[fast=false, how=fisher] = muon[nesterov=fast](sam[mode=how](g))")
    assert "nesterov=false" in opcomp.format("m", namespace)
    assert "nesterov=true" in opcomp.format("m[fast]", namespace)
    assert "mode=adaptive" in opcomp.format("m[how=adaptive]", namespace)
    with pytest.raises(opcomp.OptionValueError, match="must be true/false"):
        opcomp.format("m[fast=1]", namespace)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("adamw = g", "'adamw' is an operator"),
        ("mine = g\nmine = p", "'mine' is defined twice"),
        ("fog = g", "'fog' is defined twice"),
        ("m[a=1, a=2] = g", "listed twice"),
        ("m[a=g + p] = g", "must be a number"),
    ],
)
def test_bad_definitions_are_refused_where_written(text, words):
    with pytest.raises(opcomp.DefinitionError, match=words) as caught:
        opcomp.parse_definitions(text, "bad.opc")
    assert "bad.opc:" in str(caught.value)


def test_self_reference_is_reported_with_its_chain():
    namespace = opcomp.parse_definitions("a = muon(b)\nb = 0.5 * a")
    with pytest.raises(opcomp.DefinitionError, match=r"refers to itself \(a → b → a\)"):
        opcomp.format("a", namespace)


def test_definition_bodies_cannot_use_the_callers_options():
    namespace = opcomp.parse_definitions("inner = lam * g\nouter[lam=0.5] = inner")
    with pytest.raises(opcomp.UnknownNameError, match="unknown operator 'lam'"):
        opcomp.format("outer", namespace)


def test_file_syntax_errors_point_into_the_file():
    with pytest.raises(opcomp.OpcompSyntaxError) as caught:
        opcomp.parse_definitions("good = g\nbad = muon(\n", "defs.opc")
    assert caught.value.span.source.name == "defs.opc"
    assert caught.value.line == 2


def test_presets_without_the_builtin_namespace():
    with pytest.raises(opcomp.UnknownNameError):
        opcomp.format("fog", EMPTY)
