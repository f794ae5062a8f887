"""Typical mistakes: each gives one OpcompError with the line, a caret under the column and a fix."""

from __future__ import annotations

import pytest

import opcomp


def caret_column(error: opcomp.OpcompError) -> int:
    """The 1-based column the rendered caret points at, read back from the message itself."""
    lines = str(error).splitlines()
    caret = next(i for i, line in enumerate(lines) if line.strip() and set(line.strip()) == {"^"})
    source_line = lines[caret - 1]
    assert source_line.startswith("  ")
    return lines[caret].index("^") - 2 + 1


# (text, error type, line, column, suggestion or None, words the message must contain)
MISTAKES = [
    ("muon(kfca(g))", opcomp.UnknownNameError, 1, 6, "kfac", "unknown operator 'kfca'"),
    ("muon[beat=0.9](g)", opcomp.UnknownOptionError, 1, 6, "beta", "unknown option 'beat' of 'muon'"),
    ("sam[fishr](adamw)", opcomp.UnknownOptionError, 1, 5, "fisher", "unknown option 'fishr'"),
    ("sam[mode=fishr](adamw)", opcomp.OptionValueError, 1, 10, "fisher", "'plain', 'adaptive' or 'fisher'"),
    ("muon[steps=2.5](g)", opcomp.OptionValueError, 1, 12, None, "must be an integer"),
    ("muon[nesterov=1](g)", opcomp.OptionValueError, 1, 15, None, "must be true or false"),
    ("muon[beta=1.5](g)", opcomp.OptionValueError, 1, 11, None, "must be less than 1"),
    ("adamw[wd=-0.1]", opcomp.OptionValueError, 1, 10, None, "greater than or equal to 0"),
    ("reject(g)", opcomp.ArityError, 1, 1, None, "missing argument 'y'"),
    ("orth(g, p)", opcomp.ArityError, 1, 9, None, "takes 1 argument"),
    ("muon(kfac(g)", opcomp.OpcompSyntaxError, 1, 5, None, "'(' is never closed"),
    ("muon(g))", opcomp.OpcompSyntaxError, 1, 8, None, "')' closes nothing"),
    ("sam[rho=0.1(g)", opcomp.OpcompSyntaxError, 1, 4, None, "'[' is never closed"),
    ("sam[rho=0.1)(g)", opcomp.OpcompSyntaxError, 1, 12, None, "')' does not match '['"),
    ("muon(g) adamw", opcomp.OpcompSyntaxError, 1, 9, None, "after a complete expression"),
    ("adamw[wd=]", opcomp.OpcompSyntaxError, 1, 10, None, "expected"),
    ("muon(g) |", opcomp.OpcompSyntaxError, 1, 10, None, "ends too early"),
    ("adam % 2", opcomp.OpcompSyntaxError, 1, 6, None, "unexpected character '%'"),
    ("adamw * muon", opcomp.CompositionError, 1, 9, None, "cannot multiply two directions"),
    ("1 + adamw", opcomp.CompositionError, 1, 1, None, "cannot add the number 1"),
    ("adamw | muon", opcomp.CompositionError, 1, 9, None, "never used"),
    ("sam(sam(g))", opcomp.CompositionError, 1, 5, None, "inside another"),
    ("sam[rho](g)", opcomp.OptionValueError, 1, 5, None, "needs a value"),
    ("g(p)", opcomp.ArityError, 1, 3, None, "takes no arguments"),
    ("fog(g)", opcomp.ArityError, 1, 5, None, "takes no arguments"),
    ("pi_muon[lam=fisher]", opcomp.OptionValueError, 1, 13, None, "must be a number"),
    ("pi_muon[lamda=0.2]", opcomp.UnknownOptionError, 1, 9, "lam", "unknown option 'lamda' of 'pi_muon'"),
    ("momentum[nesterov, dampening=0.5]", opcomp.OptionValueError, 1, 1, None, "nesterov needs"),
    ("muon[gram, coefficients=polar_express]", opcomp.OptionValueError, 1, 1, None, "gram needs coefficients=jordan"),
    ("muon[beta=0.9, beta=0.8]", opcomp.OptionValueError, 1, 16, None, "given twice"),
    ("adamw(0.5)", opcomp.CompositionError, 1, 7, None, "must be a direction"),
    ("muon(\n  kfca(g))", opcomp.UnknownNameError, 2, 3, "kfac", "did you mean 'kfac'"),
]


@pytest.mark.parametrize(
    ("text", "kind", "line", "column", "suggestion", "words"), MISTAKES, ids=[m[0] for m in MISTAKES]
)
def test_mistake_points_at_its_place_and_suggests_the_fix(text, kind, line, column, suggestion, words):
    with pytest.raises(kind) as caught:
        opcomp.format(text)
    error = caught.value
    assert (error.line, error.column) == (line, column)
    assert caret_column(error) == column
    assert text.splitlines()[line - 1] in str(error)
    assert error.suggestion == suggestion
    if suggestion:
        assert f"did you mean '{suggestion}'?" in str(error)
    assert words in error.message


def test_unknown_operator_message_is_exactly_the_documented_one():
    with pytest.raises(opcomp.UnknownNameError) as caught:
        opcomp.format("kfca")
    assert caught.value.message == "unknown operator 'kfca' — did you mean 'kfac'?"


def test_empty_and_non_text_input_are_opcomp_errors():
    with pytest.raises(opcomp.OpcompError):
        opcomp.format("")
    with pytest.raises(opcomp.OpcompError):
        opcomp.format(None)  # type: ignore[arg-type]


def test_deep_nesting_is_an_error_not_a_crash():
    for text in ["(" * 500 + "g" + ")" * 500, "-" * 5000 + "g", "muon(" * 100 + "g" + ")" * 100]:
        with pytest.raises(opcomp.OpcompSyntaxError):
            opcomp.format(text)


def test_errors_inside_a_definition_name_the_definition_and_the_use():
    namespace = opcomp.parse_definitions("mine[b=0.5] = muon[beta=b](g)\n", "my.opc")
    with pytest.raises(opcomp.OptionValueError) as caught:
        opcomp.format("mine[b=2]", namespace)
    text = str(caught.value)
    assert "option 'beta' of 'muon' must be less than 1 (got 2)" in text
    assert "my.opc:1:" in text and "in definition 'mine'" in text and "used at <expr>:1:1" in text
