"""Parsing the user's forms verbatim, positions, and the canonical printer on known cases."""

from __future__ import annotations

import pytest

import opcomp
from opcomp.lang.ast import Call, Fallback, Name, Neg, Num, Option, Product, Sum

ADAM = "adam[b1=0.9, b2=0.999, eps=1e-08]"
ADAMW = "adamw[b1=0.9, b2=0.999, eps=1e-08, wd=0.01]"
MUON = "muon[beta=0.95, coefficients=jordan, gram=false, hidden=false, nesterov=true, steps=5]"
HIDDEN_MUON = "muon[beta=0.95, coefficients=jordan, gram=false, hidden=true, nesterov=true, steps=5]"
KFAC = (
    "kfac[bf16=false, block=0, damping=0.001, damping_mode=factored, decay=0.95, fisher=empirical, invert_every=10,"
    " max_dim=4096, update_every=1]"
)
DIAG_KFAC = "diag_kfac[damping=0.001, decay=0.95, update_every=1]"


def test_the_three_forms_parse_verbatim():
    assert opcomp.parse("muon(kfac(grad))") == Call("muon", (), (Call("kfac", (), (Name("grad"),)),))
    assert opcomp.parse("sam[fisher](adarms)") == Call("sam", (Option("fisher"),), (Name("adarms"),))
    assert opcomp.parse("muon(diag_kfac(g))") == Call("muon", (), (Call("diag_kfac", (), (Name("g"),)),))


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("muon(kfac(grad))", f"{MUON}({KFAC}(g))"),
        ("sam[fisher](adarms)", f"sam[eta=0.01, mode=fisher, rho=0.05]({ADAM}(g))"),
        ("muon(diag_kfac(g))", f"{MUON}({DIAG_KFAC}(g))"),
    ],
)
def test_the_three_forms_print_canonically(text, canonical):
    assert opcomp.format(text) == canonical
    assert opcomp.format(canonical) == canonical


def test_adamw_has_one_canonical_form():
    forms = {opcomp.format(t) for t in ["adamw", "adamw(g)", "adamw(grad)", "adamw[wd=0.01](grad)", " adamw \n"]}
    assert forms == {f"{ADAMW}(g)"}


def test_arithmetic_parses_with_precedence():
    tree = opcomp.parse("0.5 * adam(g) + 0.5 * muon(adam(g)) | -g - 2")
    adam = Call("adam", (), (Name("g"),))
    assert tree == Fallback(
        (
            Sum((Product((Num(0.5), adam)), Product((Num(0.5), Call("muon", (), (adam,))))), ("+",)),
            Sum((Neg(Name("g")), Num(2)), ("-",)),
        )
    )


def test_negative_number_literals_fold_and_directions_negate():
    assert opcomp.parse("-2") == Num(-2)
    assert opcomp.parse("-(2.5)") == Num(-2.5)
    assert opcomp.parse("--g") == Neg(Neg(Name("g")))
    assert opcomp.format("-adamw") == f"-1.0 * {ADAMW}(g)"
    assert opcomp.format("-(0.5 * g)") == "-0.5 * g"
    assert opcomp.format("2 * 3 * g * 0.5") == "3.0 * g"


def test_numbers_keep_their_type():
    assert opcomp.parse("3") == Num(3) and isinstance(opcomp.parse("3").value, int)
    assert isinstance(opcomp.parse("3.0").value, float)
    assert opcomp.parse("1e-3") == Num(0.001)
    assert opcomp.format("orth[steps=3]") == "orth[coefficients=jordan, gram=false, hidden=false, steps=3](g)"
    assert opcomp.format("momentum[beta=1/2]".replace("1/2", "0.5")) == (
        "momentum[beta=0.5, dampening=0.0, nesterov=false](g)"
    )


def test_option_values_may_be_number_arithmetic():
    assert opcomp.format("sam[rho=2 * 0.025](g)") == "sam[eta=0.01, mode=plain, rho=0.05](g)"
    assert opcomp.format("adamw[wd=1 - 0.9]") == opcomp.format("adamw[wd=0.09999999999999998]")


def test_flags_resolve_to_bool_options_or_enum_values():
    assert opcomp.format("momentum[nesterov](g)") == "momentum[beta=0.9, dampening=0.0, nesterov=true](g)"
    assert "damping_mode=exact" in opcomp.format("kfac[exact]")
    assert "fisher=mc" in opcomp.format("kfac[mc]")
    assert opcomp.format("zo[relative, newton]") == "zo[dist=rademacher, eps=0.001, newton=true, relative=true]"


def test_positions_are_kept_on_every_node():
    tree = opcomp.parse("muon(\n  kfac[damping=1e-3](g)\n)")
    kfac = tree.args[0]
    assert (tree.span.line, tree.span.column) == (1, 1)
    assert (kfac.span.line, kfac.span.column) == (2, 3)
    assert (kfac.options[0].span.line, kfac.options[0].span.column) == (2, 8)
    assert (kfac.options[0].value.span.line, kfac.options[0].value.span.column) == (2, 16)
    assert (kfac.args[0].span.line, kfac.args[0].span.column) == (2, 22)


def test_comments_and_newlines_are_whitespace():
    assert opcomp.format("muon(g)  # matrices\n | adamw # the rest") == opcomp.format("muon(g) | adamw")


def test_presets_expand_by_name_and_options_substitute():
    assert opcomp.format("fog") == f"{HIDDEN_MUON}({KFAC}(g)) | 0.1 * {ADAMW}(g)"
    assert opcomp.format("pi_muon[lam=0.25]") == f"0.75 * {KFAC}(g) + 0.25 * {HIDDEN_MUON}(g) | {ADAMW}(g)"
    assert (
        opcomp.format("sam_sgd[rho=0.1]")
        == "sam[eta=0.01, mode=plain, rho=0.1](momentum[beta=0.9, dampening=0.0, nesterov=false](g))"
    )


def test_parenthesised_groups_survive_printing():
    for text in ["(g + p) + g", "g + (p + g)", "(muon(g) | g) | p", "2.0 * (g + p)", "g - (p - g)"]:
        assert opcomp.parse(opcomp.to_source(opcomp.parse(text))) == opcomp.parse(text)
    assert opcomp.format("g - (p - g)") == "g - (p - g)"
