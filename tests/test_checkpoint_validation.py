"""load_state_dict checks the whole saved state before it changes anything: every corruption
either loads (cast where torch.optim casts) or raises an OpcompError, and after a refused load the
optimizer steps bit for bit as an untouched twin does."""

from __future__ import annotations

import copy
import warnings

import pytest
import shapes
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import opcomp
import opcomp.graph

EXPRESSION = "muon(kfac(g)) | adamw(g)"  # layer factors, inverses, counters, moments and momentum


def trained(dtype=torch.float32):
    """A strided-conv model and its optimizer after two steps, and the state_dict they saved."""
    model = shapes.make("strided_conv", dtype=dtype)
    opt = opcomp.build(EXPRESSION, model, lr=0.01)
    run(model, opt, 2, dtype)
    return model, opt, copy.deepcopy(opt.state_dict())


def run(model, opt, count: int, dtype=torch.float32, seed: int = 1) -> None:
    for step in range(count):
        x, y = shapes.batch("strided_conv", seed=seed + step, dtype=dtype)
        opt.zero_grad()
        shapes.loss(model, x, y).backward()
        opt.step()


def twins(saved: dict, dtype=torch.float32):
    """Two fresh optimizers over copies of one model, both loaded with ``saved``."""
    pairs = []
    for _ in range(2):
        model = shapes.make("strided_conv", seed=0, dtype=dtype)
        opt = opcomp.build(EXPRESSION, model, lr=0.01)
        opt.load_state_dict(copy.deepcopy(saved))
        pairs.append((model, opt))
    return pairs


def assert_refused_and_harmless(corrupt, match: str | None = None) -> None:
    """Loading ``corrupt(state_dict)`` is refused, and the refused optimizer then steps as its twin."""
    _, _, saved = trained()
    (model, opt), (twin, reference) = twins(saved)
    broken = corrupt(copy.deepcopy(saved))
    with pytest.raises(opcomp.OpcompError, match=match):
        opt.load_state_dict(broken)
    run(model, opt, 2, seed=7)
    run(twin, reference, 2, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert opt.param_groups[0]["lr"] == reference.param_groups[0]["lr"]
    for param, other in zip(model.parameters(), twin.parameters()):
        mine, theirs = opt.state[param], reference.state[other]
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert all(torch.equal(mine[key][n], theirs[key][n]) for n in mine[key]), key


def buffer(state_dict: dict, name: str, index: int = 0) -> tuple[dict, str]:
    """The entry of parameter ``index`` that holds buffer ``name``, and the node key."""
    for key, buffers in state_dict["state"][index].items():
        if name in buffers:
            return buffers, key
    raise KeyError(name)


def setting(value):
    def corrupt(saved):
        saved["param_groups"][0]["lr"] = value
        return saved

    return corrupt


def replaced(name: str, make):
    def corrupt(saved):
        buffers, _ = buffer(saved, name)
        buffers[name] = make(buffers[name])
        return saved

    return corrupt


CORRUPTIONS = {
    "kfac step nan": (replaced("step", lambda t: torch.tensor(float("nan"))), "inf or NaN"),
    "negative counter": (replaced("step", lambda t: torch.tensor(-3.0)), "whole number"),
    "fractional counter": (replaced("step", lambda t: torch.tensor(2.5)), "whole number"),
    "nan factor": (replaced("A", lambda t: t.clone().fill_(float("nan"))), "inf or NaN"),
    "inf momentum": (replaced("momentum_buffer", lambda t: t.clone().fill_(float("inf"))), "inf or NaN"),
    "complex": (replaced("momentum_buffer", lambda t: t.to(torch.complex64)), "dtype"),
    "bool": (replaced("momentum_buffer", lambda t: t > 0), "dtype"),
    "integer moment": (replaced("momentum_buffer", lambda t: t.to(torch.int64)), "dtype"),
    "sparse": (replaced("momentum_buffer", lambda t: t.to_sparse()), "dense"),
    "meta": (replaced("momentum_buffer", lambda t: t.to("meta")), "meta"),
    "wrong shape": (replaced("momentum_buffer", lambda t: t.flatten()), "does not fit"),
    "not a tensor": (replaced("momentum_buffer", lambda t: t.tolist()), "not a tensor"),
    "unknown buffer": (lambda s: buffer(s, "A")[0].update(extra=torch.zeros(1)) or s, "'extra'"),
    "lr nan": (setting(float("nan")), "learning rate"),
    "lr inf": (setting(float("inf")), "learning rate"),
    "lr negative": (setting(-1), "learning rate"),
    "lr True": (setting(True), "learning rate"),
    "lr text": (setting("abc"), "learning rate"),
    "lr None": (setting(None), "learning rate"),
    "empty": (lambda s: {}, "'state' and 'param_groups'"),
    "None": (lambda s: None, "'state' and 'param_groups'"),
    "a list": (lambda s: [s], "'state' and 'param_groups'"),
    "no groups": (lambda s: {"state": s["state"]}, "'state' and 'param_groups'"),
    "groups not a list": (lambda s: {**s, "param_groups": 5}, "not a list"),
    "params None": (lambda s: s["param_groups"][0].update(params=None) or s, "'params'"),
    "group not a dict": (lambda s: {**s, "param_groups": [None]}, "param group 0"),
    "state not a dict": (lambda s: {**s, "state": [1]}, "'state'"),
    "entry not a dict": (lambda s: s["state"].update({0: 5}) or s, "not a dict of nodes"),
    "buffers not a dict": (lambda s: s["state"][0].update({buffer(s, "A")[1]: 5}) or s, "not a dict of buffers"),
    "int node key": (lambda s: s["state"][0].update({7: {}}) or s, "node key"),
    "text index": (lambda s: {**s, "state": {"0": s["state"][0]}}, "names parameter"),
    "unknown index": (lambda s: s["state"].update({99: {}}) or s, "names parameter"),
    "repeated index": (lambda s: s["param_groups"][0]["params"].__setitem__(1, 0) or s, "twice"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_corrupt_checkpoint_is_refused_and_the_optimizer_steps_as_if_it_was_never_tried(name):
    corrupt, match = CORRUPTIONS[name]
    assert_refused_and_harmless(corrupt, match)


def test_floating_state_is_cast_to_the_parameters_precision_as_torch_optim_does():
    """A float64 checkpoint of float32 parameters loads as its float32 values would, and steps."""
    _, _, saved = trained()
    doubled = copy.deepcopy(saved)
    for entries in doubled["state"].values():
        for buffers in entries.values():
            for name, tensor in buffers.items():
                buffers[name] = tensor.double()
    (model, opt), (twin, reference) = twins(saved)
    opt.load_state_dict(doubled)
    for param in model.parameters():
        assert all(t.dtype == torch.float32 for b in opt.state[param].values() for t in b.values())
    run(model, opt, 2, seed=7)
    run(twin, reference, 2, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_integer_counters_load_as_counters():
    _, _, saved = trained()
    counted = copy.deepcopy(saved)
    buffers, _ = buffer(counted, "step")
    buffers["step"] = buffers["step"].to(torch.int64)
    (model, opt), (twin, reference) = twins(saved)
    opt.load_state_dict(counted)
    run(model, opt, 2, seed=7)
    run(twin, reference, 2, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_reading_a_checkpoint_with_long_unknown_keys_never_parses_them(monkeypatch):
    """Saved keys are read again (older spellings) only when they could be one of this plan's:
    100 unknown keys of 60,000 characters are dropped without being parsed, so load time stays
    linear in the checkpoint's size."""
    _, opt, saved = trained()
    for number in range(100):
        saved["state"][0][f"adamw[wd={number}]({'g + ' * 15_000}g)"] = {}
    read: list[str] = []
    original = opcomp.graph.current_state_key

    def counted(key: str) -> str:
        read.append(key)
        return original(key)

    monkeypatch.setattr("opcomp.checkpoint.current_state_key", counted)
    with pytest.warns(opcomp.OpcompWarning, match=r"left behind .* and 95 more"):
        opt.load_state_dict(saved)
    assert not [key for key in read if len(key) > 10_000]


CORRUPTIBLE = ["param_groups", "state"]


@st.composite
def corruptions(draw):
    """A path into a saved state_dict, and what to put there."""
    values = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-5, 5),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=5),
        st.lists(st.integers(0, 3), max_size=3),
        st.dictionaries(st.integers(0, 3), st.none(), max_size=2),
        st.sampled_from(
            [
                torch.tensor(float("nan")),
                torch.tensor(-1.0),
                torch.zeros(2),
                torch.ones(3, dtype=torch.complex64),
                torch.zeros((), dtype=torch.bool),
                torch.empty(0),
            ]
        ),
    )
    return draw(st.lists(st.integers(0, 50), min_size=1, max_size=4)), draw(values)


def corrupted(saved: dict, path: list[int], value):
    """``saved`` with the node at ``path`` (each step picks a child by index, modulo their count)
    replaced by ``value``."""
    node = saved
    for depth, step in enumerate(path):
        keys = list(node.keys()) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        key = keys[step % len(keys)]
        child = node[key]
        if depth == len(path) - 1 or not isinstance(child, (dict, list)):
            node[key] = value
            return saved
        node = child
    return saved


_, _, SAVED = trained()


@settings(max_examples=60, deadline=None)
@given(corruptions())
def test_every_corruption_loads_or_is_refused_and_a_refusal_changes_nothing(corruption):
    path, value = corruption
    broken = corrupted(copy.deepcopy(SAVED), path, value)
    (model, opt), (twin, reference) = twins(SAVED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", opcomp.OpcompWarning)
        try:
            opt.load_state_dict(broken)
        except opcomp.OpcompError:
            run(model, opt, 1, seed=7)
            run(twin, reference, 1, seed=7)
            assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
            return
        run(model, opt, 1, seed=7)  # loaded: it steps, and the step keeps its promise
    assert all(torch.isfinite(p).all() for p in model.parameters())
