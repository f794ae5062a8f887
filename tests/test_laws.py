"""Laws of the language, checked on generated trees and text."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from strategies import canonical_exprs, raw_exprs

import opcomp
from opcomp.graph import build_graph
from opcomp.lang.printer import to_source
from opcomp.resolve import canonicalize


@given(canonical_exprs())
def test_parse_of_format_is_identity_on_canonical_trees(expr):
    assert opcomp.parse(opcomp.format(expr)) == expr


@given(raw_exprs())
def test_parse_of_to_source_is_identity_on_any_tree(expr):
    assert opcomp.parse(to_source(expr)) == expr


@given(raw_exprs())
def test_format_is_idempotent_wherever_it_succeeds(expr):
    try:
        text = opcomp.format(expr)
    except opcomp.OpcompError:
        return
    assert opcomp.format(text) == text


@given(canonical_exprs())
def test_lowering_is_idempotent(expr):
    graph = opcomp.lower(expr)
    assert opcomp.lower(expr) == graph
    assert opcomp.lower(graph.canonical) == graph
    assert build_graph(canonicalize(graph.expr)) == graph


@given(canonical_exprs())
def test_every_distinct_sub_expression_is_one_node(expr):
    graph = opcomp.lower(expr)
    keys = [node.state_key for node in graph.nodes]
    assert len(keys) == len(set(keys))
    assert all(i < node.id for node in graph.nodes for i in node.inputs)
    assert graph.root.key == opcomp.format(expr)


_GRAMMAR_CHARACTERS = "adgkmprsuow_fl()[]=,|+-*.0123456789e \n#"


@given(st.one_of(st.text(), st.text(alphabet=_GRAMMAR_CHARACTERS, max_size=40)))
def test_arbitrary_text_raises_only_opcomp_errors(text):
    try:
        opcomp.format(text)
    except opcomp.OpcompError as error:
        assert error.message


@given(raw_exprs(), st.data())
def test_damaged_expressions_raise_only_opcomp_errors(expr, data):
    text = to_source(expr)
    position = data.draw(st.integers(0, len(text)))
    insert = data.draw(st.sampled_from(["", "(", ")", "[", "]", ",", "=", "|", "-", "*", "1e", "x"]))
    cut = data.draw(st.integers(0, 2))
    damaged = text[:position] + insert + text[position + cut :]
    for run in (opcomp.parse, opcomp.format, opcomp.lower):
        try:
            run(damaged)
        except opcomp.OpcompError:
            pass
