"""The lowered graph: sharing, scoping under sam, requirements, and whole-graph checks."""

from __future__ import annotations

import pytest

import opcomp
from opcomp.ops import Applies


def ops(graph: opcomp.Graph) -> list[str]:
    return [node.op for node in graph.nodes]


def test_shared_sub_expression_is_one_node_with_one_state():
    graph = opcomp.lower("0.5 * adam(g) + 0.5 * muon(adam(g))")
    assert ops(graph).count("adam") == 1
    adam = next(n for n in graph.nodes if n.op == "adam")
    assert [n.op for n in graph.shared()] == ["adam"]
    assert {graph.nodes[u].op for u in graph.users[adam.id]} == {"scale", "muon"}
    assert ops(graph) == ["g", "adam", "scale", "muon", "scale", "sum"]


def test_sharing_sees_through_aliases_defaults_and_definitions():
    graph = opcomp.lower("adarms(grad) + adam[b1=0.9](g) + muon_adamw - (muon[hidden](g) | 0.1 * adamw)")
    assert ops(graph).count("adam") == 1
    assert ops(graph).count("muon") == 1
    assert ops(graph).count("fallback") == 1
    assert ops(graph).count("g") == 1


def test_different_options_are_different_nodes():
    graph = opcomp.lower("adam[b1=0.9](g) + adam[b1=0.8](g)")
    assert ops(graph).count("adam") == 2
    assert len({n.state_key for n in graph.nodes}) == len(graph.nodes)


def test_inside_sam_the_gradient_is_the_probed_one_and_is_not_shared_with_outside():
    graph = opcomp.lower("sam(adamw) + adamw + sam(p)")
    adamws = [n for n in graph.nodes if n.op == "adamw"]
    assert len(adamws) == 2
    inner, outer = adamws
    assert inner.key == outer.key
    assert inner.scope is not None and outer.scope is None
    assert inner.state_key != outer.state_key
    sam = "sam[eta=0.01, mode=plain, rho=0.05](adamw[b1=0.9, b2=0.999, eps=1e-08, wd=0.01](g))"
    assert inner.state_key.endswith(f"in {sam}")
    # `p` does not read the gradient, so it is one node inside and outside sam
    assert ops(graph).count("p") == 1


def test_state_keys_are_canonical_text_so_state_survives_a_rebuild():
    first = opcomp.lower("muon(adam(g)) | adamw")
    second = opcomp.lower("0.5 * adarms(grad) + muon(adarms) | adamw")
    key = {n.state_key for n in first.stateful()} & {n.state_key for n in second.stateful()}
    assert "adam[b1=0.9, b2=0.999, eps=1e-08](g)" in key


def test_dead_fallback_branch_is_refused_and_a_restricted_one_is_not():
    with pytest.raises(opcomp.CompositionError, match="never used"):
        opcomp.lower("muon(g) | adamw | g")
    with pytest.raises(opcomp.CompositionError, match="never used"):
        opcomp.lower("(g | p) + muon(g)")
    graph = opcomp.lower("muon(g) | kfac(g) | adamw")
    assert graph.restrictions(graph.root.inputs[0]) == {Applies.MATRIX}
    assert graph.restrictions(graph.root.inputs[1]) == {Applies.LAYER}
    assert graph.restrictions(graph.root.id) == frozenset()


def test_restrictions_accumulate_along_a_chain():
    graph = opcomp.lower("momentum(muon(kfac(g)))")
    assert graph.restrictions(graph.root.id) == {Applies.MATRIX, Applies.LAYER}


def test_nested_gradient_probes_are_refused_even_through_definitions():
    with pytest.raises(opcomp.CompositionError, match="inside another"):
        opcomp.lower("sam(momentum(sam_sgd))")


@pytest.mark.parametrize(
    ("text", "closure", "model", "double_backward"),
    [
        ("adamw", False, False, False),
        ("fog", False, True, False),
        ("kfac[fisher=mc](g) | g", False, True, False),  # sampled in the model's own forward
        ("f3eo", True, False, True),
        ("fs_adarmsuon", True, False, False),
        ("adagnoema", True, True, False),
        ("mezo", True, False, False),
    ],
)
def test_needs_are_collected_over_the_graph(text, closure, model, double_backward):
    needs = opcomp.lower(text).needs
    assert (needs.closure, needs.model, needs.double_backward) == (closure, model, double_backward)


def test_graph_equality_ignores_where_things_were_written():
    assert opcomp.lower("adamw") == opcomp.lower("\n\n   adamw(grad)  # same")
    assert opcomp.lower("adamw") != opcomp.lower("adam")
