"""EKFAC, diagonal KFAC, layers with leading dimensions and embeddings, against their formulas."""

from __future__ import annotations

import pytest
import torch
from fisher import block_vectors, empirical_fisher, node_state, per_example_gradients
from torch import nn
from torch.nn import functional as F

import opcomp


def data(size: int = 12, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 4, generator=generator), torch.randint(0, 3, (size,), generator=generator)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_ekfac_equals_kfac_with_exact_damping_before_its_correction():
    x, y = data()
    first, second = mlp(), mlp()
    train(first, opcomp.build("ekfac[damping=0.01](g)", first, lr=0.1), [(x, y)])
    train(second, opcomp.build("kfac[damping=0.01, damping_mode=exact](g)", second, lr=0.1), [(x, y)])
    for a, b in zip(first.parameters(), second.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_ekfac_after_its_correction_is_never_farther_from_the_exact_block():
    x, y = data(16, seed=1)  # distinct inputs: KFAC is not exact here
    model = mlp()
    opt = opcomp.build("ekfac[decay=0.0, invert_every=2](g)", model, lr=0.0)
    train(model, opt, [(x, y), (x, y)])  # refresh on the first step, refit on the second
    examples = per_example_gradients(model, lambda out, t: F.cross_entropy(out, t), x, y)
    closer = 0
    for layer in ("0", "2"):
        state = node_state(opt, model.get_submodule(layer).weight, "ekfac")
        fisher = empirical_fisher(block_vectors(examples, layer))
        basis = torch.kron(state["Q_G"], state["Q_A"])
        corrected = basis @ torch.diag(state["scale"].flatten()) @ basis.T
        kfac = torch.kron(state["G"], state["A"])
        distance_ekfac = torch.linalg.norm(fisher - corrected)
        distance_kfac = torch.linalg.norm(fisher - kfac)
        assert distance_ekfac <= distance_kfac * (1 + 1e-5)
        closer += bool(distance_ekfac < 0.99 * distance_kfac)
    assert closer >= 1  # and strictly closer where the Kronecker eigenvalues were off


def test_diag_kfac_equals_its_formula():
    torch.manual_seed(3)
    model = nn.Linear(4, 3)
    x, y = data(10, seed=2)
    damping = 0.01
    opt = opcomp.build(f"diag_kfac[damping={damping}](g)", model, lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    gradient = torch.cat([model.weight.grad, model.bias.grad.unsqueeze(1)], 1)
    opt.step()
    # independent: for a lone Linear, the per-example output gradient is softmax − onehot
    a = torch.cat([x, torch.ones(10, 1)], 1)
    d = torch.softmax(x @ before[0].T + before[1], 1) - F.one_hot(y, 3)
    a_diag, g_diag = a.square().mean(0), d.square().mean(0)
    expected = gradient / ((g_diag + damping).unsqueeze(1) * (a_diag + damping))
    got = torch.cat(
        [(before[0] - model.weight.detach()) / 1e-2, ((before[1] - model.bias.detach()) / 1e-2).unsqueeze(1)], 1
    )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_linear_over_leading_dimensions_treats_every_position_as_a_row():
    torch.manual_seed(4)
    model = nn.Linear(4, 3)
    x = torch.randn(5, 7, 4)
    y = torch.randint(0, 3, (5, 7))
    opt = opcomp.build("kfac(g)", model, lr=0.0)
    logits = model(x)
    F.cross_entropy(logits.reshape(-1, 3), y.reshape(-1)).backward()  # mean over 35 tokens
    opt.step()
    state = node_state(opt, model.weight, "kfac")
    a = torch.cat([x.reshape(-1, 4), torch.ones(35, 1)], 1)
    per_example = (torch.softmax(logits.detach(), -1) - F.one_hot(y, 3)).reshape(-1, 3) / 7  # ℓ_n = mean over its 7
    torch.testing.assert_close(state["A"], a.T @ a / 35)
    torch.testing.assert_close(state["G"], per_example.T @ per_example / 5)


def test_embedding_has_a_diagonal_input_factor_from_token_counts():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Embedding(6, 4), nn.Linear(4, 3))
    tokens = torch.tensor([[0, 1, 1, 5], [2, 1, 0, 0]])
    y = torch.randint(0, 3, (2, 4))
    damping = 0.01
    opt = opcomp.build(f"kfac[damping={damping}](g) | g", model, lr=1e-2)
    before = model[0].weight.detach().clone()
    head = model[1].weight.detach().clone()  # the step moves it
    logits = model(tokens)
    F.cross_entropy(logits.reshape(-1, 3), y.reshape(-1)).backward()
    gradient = model[0].weight.grad.clone()
    opt.step()
    state = node_state(opt, model[0].weight, "kfac")
    torch.testing.assert_close(state["A"], torch.tensor([3, 3, 1, 0, 0, 1]) / 8.0)
    per_example = ((torch.softmax(logits.detach(), -1) - F.one_hot(y, 3)) @ head).reshape(-1, 4) / 4
    g = per_example.T @ per_example / 2
    torch.testing.assert_close(state["G"], g)
    pi = ((state["A"].sum() / 6) / (g.trace() / 4)).sqrt()
    lambda_a, lambda_g = pi * damping**0.5, damping**0.5 / pi
    expected = gradient / (state["A"] + lambda_a).unsqueeze(1) @ torch.linalg.inv(g + lambda_g * torch.eye(4))
    torch.testing.assert_close((before - model[0].weight.detach()) / 1e-2, expected, rtol=1e-4, atol=1e-6)


def test_statistics_are_captured_only_when_due_and_inverted_on_schedule():
    model = mlp()
    opt = opcomp.build("kfac[update_every=2, invert_every=4](g)", model, lr=1e-3)
    state = None
    for step in range(5):
        x, y = data(8, seed=step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        recorded = sum(len(entries) for entries in opt._capture.entries.values())
        assert recorded == (2 if step % 2 == 0 else 0), step  # two layers, one forward each
        opt.step()
        state = node_state(opt, model[0].weight, "kfac")
        if step == 0:
            first_inverse = state["A_inv"].clone()
        if step == 3:
            assert torch.equal(state["A_inv"], first_inverse)  # not refreshed until step 4
    assert not torch.equal(state["A_inv"], first_inverse)
    assert int(state["step"]) == 5


def test_evaluation_passes_do_not_feed_the_statistics():
    model = mlp()
    opt = opcomp.build("kfac(g)", model, lr=1e-3)
    with torch.no_grad():
        model(torch.randn(3, 4))
    assert all(not entries for entries in opt._capture.entries.values())


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("kfac(g)", "'kfac' cannot apply to parameter '1.weight' (shape (5,), in a LayerNorm)"),
        ("muon(kfac(g)) | adamw", None),
    ],
)
def test_parameters_of_unsupported_modules_fall_back_or_are_named(expression, message):
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    if message is None:
        opt = opcomp.build(expression, model)
        assert opt.assignments()["1.weight"] == "adamw" and opt.assignments()["0.weight"] == "muon ← kfac"
        return
    with pytest.raises(opcomp.OpcompError) as caught:
        opcomp.build(expression, model)
    assert message in str(caught.value) and "| adamw(g)" in str(caught.value)


def test_layer_configurations_the_statistics_do_not_cover_are_refused_at_build():
    with pytest.raises(opcomp.OpcompError, match="grouped Conv2d"):
        opcomp.build("kfac(g)", nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(opcomp.OpcompError, match="padding_mode='zeros'"):
        opcomp.build("kfac(g)", nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(opcomp.OpcompError, match="even kernel"):
        opcomp.build("kfac(g)", nn.Conv2d(2, 2, 2, padding="same"))


def test_a_step_without_statistics_says_how_to_get_them():
    model = mlp()
    opt = opcomp.build("kfac(g)", model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(opcomp.OpcompError, match="has no statistics: its forward and backward must run"):
        opt.step()


def test_monte_carlo_fisher_needs_a_likelihood():
    with pytest.raises(opcomp.OpcompError, match="likelihood='categorical'"):
        opcomp.build("kfac[mc](g)", mlp())


def test_resume_with_kfac_statistics_is_bitwise():
    batches = [data(8, seed=s) for s in range(8)]
    straight = mlp()
    train(straight, opcomp.build("muon(kfac[invert_every=3](g)) | adamw", straight, lr=0.01), batches)
    first = mlp()
    opt = opcomp.build("muon(kfac[invert_every=3](g)) | adamw", first, lr=0.01)
    train(first, opt, batches[:4])
    saved = opt.state_dict()
    resumed = mlp()
    resumed.load_state_dict(first.state_dict())
    opt = opcomp.build("muon(kfac[invert_every=3](g)) | adamw", resumed, lr=0.01)
    opt.load_state_dict(saved)
    train(resumed, opt, batches[4:])
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_accumulated_micro_batches_give_the_factors_of_the_whole_batch(reduction):
    x, y = data(12, seed=7)
    factors = []
    for halves in (False, True):
        model = mlp()
        opt = opcomp.build("kfac(g)", model, lr=0.0, reduction=reduction)
        for part in ((x[:6], y[:6]), (x[6:], y[6:])) if halves else ((x, y),):
            F.cross_entropy(model(part[0]), part[1], reduction=reduction).backward()
        opt.step()
        state = node_state(opt, model[0].weight, "kfac")
        factors.append((state["A"], state["G"]))
    torch.testing.assert_close(factors[0][0], factors[1][0])
    # with a mean, each half's loss averages its own 6 examples; rescaled per micro-batch, the
    # per-example gradients, and so G, are those of the whole batch
    torch.testing.assert_close(factors[0][1], factors[1][1])


def test_conv2d_factors_with_stride_dilation_and_padding_match_patches_taken_by_hand():
    torch.manual_seed(8)
    conv = nn.Conv2d(2, 3, kernel_size=2, stride=2, dilation=2, padding=1)
    model = nn.Sequential(conv, nn.Flatten(), nn.LazyLinear(4))
    x = torch.randn(3, 2, 7, 7)
    model(x)  # materialise the lazy layer before building
    opt = opcomp.build("kfac(g) | g", model, lr=0.0)
    outputs = []

    def keep(module, args, output):  # returns None, so the output is left as it is
        output.retain_grad()
        outputs.append(output)

    conv.register_forward_hook(keep)
    F.cross_entropy(model(x), torch.tensor([0, 1, 3])).backward()
    opt.step()
    (out,) = outputs
    padded = F.pad(x, (1, 1, 1, 1))
    rows = []
    for n in range(3):  # every output position's patch, read off the padded input by hand
        patches = []
        for i in range(out.shape[2]):
            for j in range(out.shape[3]):
                top, left = 2 * i, 2 * j
                patch = padded[n, :, top : top + 3 : 2, left : left + 3 : 2]  # 2×2 taps, dilation 2
                patches.append(torch.cat([patch.flatten(), torch.ones(1)]))
        rows.append(torch.stack(patches).mean(0))
    a = torch.stack(rows)
    d = (out.grad * 3).flatten(2).sum(2)  # per-example (mean over 3), summed over positions
    state = node_state(opt, conv.weight, "kfac")
    torch.testing.assert_close(state["A"], a.T @ a / 3)
    torch.testing.assert_close(state["G"], d.T @ d / 3)


def test_overflowing_layer_statistics_skip_the_step_and_change_nothing():
    model = mlp()
    opt = opcomp.build("muon(kfac(g)) | adamw", model, lr=0.01)
    train(model, opt, [data(8, seed=9)])
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in node_state(opt, model[0].weight, "kfac").items()}
    x, y = data(8, seed=10)
    opt.zero_grad()
    F.cross_entropy(model(x * 1e25), y).backward()  # a aᵀ overflows; the gradient stays finite
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    after = node_state(opt, model[0].weight, "kfac")
    assert all(torch.equal(state[k], after[k]) for k in state)
