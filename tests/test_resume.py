"""Resuming from state_dict continues bit for bit, through torch.save and torch.load(weights_only=True)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import opcomp
from opcomp.graph import current_state_key


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 2))


def data(count: int):
    generator = torch.Generator().manual_seed(5)
    return [(torch.randn(16, 6, generator=generator), torch.randn(16, 2, generator=generator)) for _ in range(count)]


def run(net, opt, batches, scheduler=None):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def through_disk(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


EXPRESSIONS = [
    "adamw(g)",
    "muon(g) | adamw(g)",
    "0.5 * adam(g) + 0.5 * muon(adam(g)) | momentum[nesterov](clip(g)) + 0.01 * p",
    "adarmsuon | rms(ema[debias](g))",
    "muon[hidden](kfac[update_every=3, invert_every=4](g)) | adamw",  # step counts kept on the host
]


@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_ten_plus_ten_steps_equal_twenty_bitwise(expression):
    batches = data(20)
    straight = model()
    opt = opcomp.build(expression, straight, lr=0.01)
    run(straight, opt, batches)

    first = model()
    opt = opcomp.build(expression, first, lr=0.01)
    run(first, opt, batches[:10])
    saved = through_disk({"model": first.state_dict(), "opt": opt.state_dict()})

    resumed = model()
    resumed.load_state_dict(saved["model"])
    opt = opcomp.build(expression, resumed, lr=0.01)
    opt.load_state_dict(saved["opt"])
    run(resumed, opt, batches[10:])
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_resume_restores_the_scheduler_and_group_settings():
    batches = data(20)
    straight = model()
    opt = opcomp.build("adamw", straight, lr=0.05)
    run(straight, opt, batches, torch.optim.lr_scheduler.ExponentialLR(opt, 0.9))

    first = model()
    opt = opcomp.build("adamw", first, lr=0.05)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)
    run(first, opt, batches[:10], scheduler)
    saved = through_disk({"model": first.state_dict(), "opt": opt.state_dict(), "sched": scheduler.state_dict()})

    resumed = model()
    resumed.load_state_dict(saved["model"])
    opt = opcomp.build("adamw", resumed, lr=0.05)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)
    opt.load_state_dict(saved["opt"])
    scheduler.load_state_dict(saved["sched"])
    run(resumed, opt, batches[10:], scheduler)
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))


def test_state_is_keyed_by_canonical_sub_expression_and_carries_to_a_sharing_expression():
    net = model()
    opt = opcomp.build("adam(g)", net, lr=0.01)
    run(net, opt, data(3))
    keys = set(opt.state_dict()["state"][0])
    assert keys == {"adam[b1=0.9, b2=0.999, eps=1e-08](g)"}
    rebuilt = opcomp.build("muon(adarms(grad)) | adam", net, lr=0.01)
    rebuilt.load_state_dict(opt.state_dict())
    state = rebuilt.state[next(net.parameters())]
    assert torch.equal(
        state["adam[b1=0.9, b2=0.999, eps=1e-08](g)"]["exp_avg"],
        opt.state[next(net.parameters())]["adam[b1=0.9, b2=0.999, eps=1e-08](g)"]["exp_avg"],
    )
    assert "muon[beta=0.95, nesterov=true, steps=5](adam[b1=0.9, b2=0.999, eps=1e-08](g))" not in state


def test_loading_a_foreign_or_mismatched_state_dict_is_a_clear_error():
    net = model()
    torch_opt = torch.optim.AdamW(net.parameters())
    run(net, torch_opt, data(1))
    opt = opcomp.build("adamw", net)
    with pytest.raises(opcomp.OpcompError, match="not saved by an opcomp optimizer"):
        opt.load_state_dict(torch_opt.state_dict())
    other = opcomp.build("adamw", list(net.parameters())[:2])
    with pytest.raises(opcomp.OpcompError, match="the saved state has 6 parameters"):
        other.load_state_dict(opt.state_dict())


OLD_CHECKPOINT = Path(__file__).parent / "data" / "checkpoint_4cc191a.pt"


@pytest.mark.parametrize("expression", ["muon(g) | adamw(g)", "adarmsuon | rms(ema[debias](g))"])
def test_a_checkpoint_from_before_an_option_was_added_loads_whole_and_continues(expression):
    # Saved by opcomp at commit 4cc191a, before orth/muon/adarmsuon gained `coefficients`: the model
    # and optimizer after 10 steps, and the parameters that version reached after 10 more.
    saved = torch.load(OLD_CHECKPOINT, weights_only=True)[expression]
    (old_key,) = {key for entries in saved["opt"]["state"].values() for key in entries if "steps=5" in key}
    assert "coefficients" not in old_key
    net = model()
    net.load_state_dict(saved["model"])
    opt = opcomp.build(expression, net, lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may be left behind
        opt.load_state_dict(saved["opt"])
    assert sum(len(entries) for entries in opt.state.values()) == sum(
        len(entries) for entries in saved["opt"]["state"].values()
    )
    run(net, opt, data(20)[10:])
    for name, value in net.state_dict().items():
        torch.testing.assert_close(value, saved["after"][name], rtol=0, atol=1e-6, msg=name)


def test_state_no_node_keeps_is_dropped_with_a_warning_that_names_it():
    net = model()
    opt = opcomp.build("muon(kfac(g)) | adamw(g)", net, lr=0.01)
    run(net, opt, data(2))
    saved = opt.state_dict()
    fresh = opcomp.build("muon(g) | adamw(g)", model(), lr=0.01)
    with pytest.warns(opcomp.OpcompWarning, match=r"left behind .*'kfac\[.*\(3 parameters\)"):
        fresh.load_state_dict(saved)


@pytest.mark.parametrize("preset", opcomp.presets().names())
def test_reading_a_state_key_again_gives_it_back(preset):
    # load_state_dict reads every saved key again (current_state_key); today's keys, probe scopes
    # included ("… in sam[…](…)"), must come back unchanged or state would be lost on every load.
    keys = {node.state_key for node in opcomp.lower(preset).nodes}
    assert {current_state_key(key) for key in keys} == keys
