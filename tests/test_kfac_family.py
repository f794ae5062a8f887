"""EKFAC, diagonal KFAC, layers with leading dimensions and embeddings, against their formulas."""

from __future__ import annotations

from contextlib import nullcontext
from unittest.mock import patch

import pytest
import shapes
import torch
import torch.utils.checkpoint
from fisher import block_vectors, empirical_fisher, node_state, per_example_gradients
from hypothesis import given, settings
from hypothesis import strategies as st
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


def ekfac_reference(model, opt, x, y, layer_name: str) -> torch.Tensor:
    """E_n[(Q_Gᵀ ∇W_n Q_A)²] in the optimizer's eigenbasis, ∇W_n from torch.func per-example gradients."""
    examples = per_example_gradients(model, lambda out, t: F.cross_entropy(out, t), x, y)
    layer = model.get_submodule(layer_name)
    state = node_state(opt, layer.weight, "ekfac")
    if isinstance(layer, nn.Embedding):  # X = ∇Wᵀ (dim, vocabulary), Q_A = I
        return (state["Q_G"].T @ examples[f"{layer_name}.weight"].transpose(1, 2)).square().mean(0)
    vectors = block_vectors(examples, layer_name).reshape(len(x), layer.weight.shape[0], -1)
    return (state["Q_G"].T @ vectors @ state["Q_A"]).square().mean(0)


@pytest.mark.parametrize("name", ["mlp", "strided_conv", "token_model"])
def test_ekfac_scale_is_the_mean_square_of_rotated_per_example_gradients(name):
    """Positions of a conv or a sequence are summed into each example's gradient before squaring."""
    model, (x, y) = shapes.make(name), shapes.batch(name, 24)
    opt = opcomp.build("ekfac[invert_every=1](g) | g", model, lr=0.0)
    shapes.loss(model, x, y).backward()
    opt.step()
    names = [*shapes.layers(model), *(["embed"] if name == "token_model" else [])]
    for layer_name in names:
        state = node_state(opt, model.get_submodule(layer_name).weight, "ekfac")
        expected = ekfac_reference(model, opt, x, y, layer_name)
        torch.testing.assert_close(state["scale"], expected, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("channels", [(3, 3), (20, 6)])
def test_ekfac_scale_of_convs_without_a_bias_column_is_the_mean_square_of_rotated_weight_gradients(channels):
    """Convolutions with no bias column to add, against per-example weight gradients from
    torch.func. With fewer output channels than positions (3 channels on 16, then on 4
    positions) each example's gradient is summed over its positions, then rotated by Q_A; with
    more (20 and 6), the patches are rotated first, as convolutions with Q_A's columns as kernels."""
    torch.manual_seed(0)
    first, second = channels
    model = nn.Sequential(
        nn.Conv2d(2, first, kernel_size=3, stride=2, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(first, second, kernel_size=2, dilation=2, bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(second, shapes.CLASSES),
    ).double()
    assert_conv_scales_match_torch_func(model, *shapes.batch("strided_conv", 24), with_bias=False)


@pytest.mark.parametrize("channels", [(3, 3), (40, 20)])
def test_ekfac_scale_of_convs_on_rectangular_maps_is_the_mean_square_of_rotated_gradients(channels):
    """Maps taller than wide, kernels, strides and dilations that differ by dimension, biases
    folded in, against per-example gradients from torch.func. With fewer output channels than
    positions (3 on 6 × 5, then on 4 × 4) each example's gradient is summed, then rotated; with
    more (40, 20) the patches are rotated first."""
    torch.manual_seed(0)
    first, second = channels
    model = nn.Sequential(
        nn.Conv2d(2, first, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0)),
        nn.ReLU(),
        nn.Conv2d(first, second, kernel_size=2, dilation=(2, 1)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(second, shapes.CLASSES),
    ).double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(24, 2, 11, 6, generator=generator, dtype=torch.float64)
    y = torch.randint(0, shapes.CLASSES, (24,), generator=generator)
    assert_conv_scales_match_torch_func(model, x, y, with_bias=True)


def assert_conv_scales_match_torch_func(model: nn.Sequential, x, y, with_bias: bool) -> None:
    """EKFAC's scale of the convs at 0 and 2 after one step, against per-example gradients."""
    opt = opcomp.build("ekfac[invert_every=1](g) | g", model, lr=0.0)
    shapes.loss(model, x, y).backward()
    opt.step()
    examples = per_example_gradients(model, lambda out, t: F.cross_entropy(out, t), x, y)
    for name in ("0", "2"):
        weight = model.get_submodule(name).weight
        state = node_state(opt, weight, "ekfac")
        vectors = block_vectors(examples, name, with_bias=with_bias).reshape(len(x), weight.shape[0], -1)
        expected = (state["Q_G"].T @ vectors @ state["Q_A"]).square().mean(0)
        torch.testing.assert_close(state["scale"], expected, rtol=1e-9, atol=1e-14)


def test_ekfac_corrects_right_after_each_refresh_and_averages_in_between():
    model = shapes.make("strided_conv")
    batches = [shapes.batch("strided_conv", 24, seed=s) for s in range(3)]
    decay = 0.9
    opt = opcomp.build(f"ekfac[invert_every=2, decay={decay}](g) | g", model, lr=0.0)
    layer = model[0]
    expected = None
    for step, (x, y) in enumerate(batches):
        opt.zero_grad()
        shapes.loss(model, x, y).backward()
        opt.step()
        fresh = ekfac_reference(model, opt, x, y, "0")  # in the basis the step ended with
        # refresh on steps 0 and 2: the scale restarts from that batch's correction in the new basis
        expected = fresh if step % 2 == 0 else decay * expected + (1 - decay) * fresh
        torch.testing.assert_close(node_state(opt, layer.weight, "ekfac")["scale"], expected, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("name", ["strided_conv", "token_model"])
def test_ekfac_is_never_farther_from_the_per_example_fisher_than_kfac(name):
    """In a fixed basis Q, the diagonal closest to F in Frobenius norm is diag(Qᵀ F Q), which is
    EKFAC's scale; G ⊗ A is another diagonal in the same basis, so EKFAC is at least as close."""
    model, (x, y) = shapes.make(name), shapes.batch(name, 24)
    opt = opcomp.build("ekfac[invert_every=1](g) | g", model, lr=0.0)
    shapes.loss(model, x, y).backward()
    opt.step()
    examples = per_example_gradients(model, lambda out, t: F.cross_entropy(out, t), x, y)
    for layer_name in shapes.layers(model):
        state = node_state(opt, model.get_submodule(layer_name).weight, "ekfac")
        fisher = empirical_fisher(block_vectors(examples, layer_name))
        basis = torch.kron(state["Q_G"], state["Q_A"])
        corrected = basis @ torch.diag(state["scale"].flatten()) @ basis.T
        distance_ekfac = torch.linalg.norm(fisher - corrected)
        distance_kfac = torch.linalg.norm(fisher - torch.kron(state["G"], state["A"]))
        assert distance_ekfac <= distance_kfac * (1 + 1e-9), layer_name


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


@pytest.mark.parametrize("model_name", ["mlp", "strided_conv", "token_model"])
def test_diag_kfac_divides_every_weight_and_bias_entry_by_its_factor_diagonals(model_name):
    """On strided and dilated convolutions (weights (out, in, kh, kw)) and an Embedding (whose X is
    its weight transposed): entry (o, i) of X over (G_o + λ)(A_i + λ), a bias over (G_o + λ)
    times its own A entry (the last), from the node's diagonals after its first step, laid out
    here by hand."""
    model = shapes.make(model_name)
    x, y = shapes.batch(model_name)
    damping = 0.01
    opt = opcomp.build(f"diag_kfac[damping={damping}](g)", model, lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    shapes.loss(model, x, y).backward()
    grads = {p: p.grad.clone() for p in model.parameters()}
    opt.step()
    moved = {p: old - p.detach() for p, old in zip(model.parameters(), before)}
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding))]
    assert {p for m in layers for p in m.parameters()} == set(moved)
    for module in layers:
        state = node_state(opt, module.weight, "diag_kfac")
        g, a = state["G_diag"] + damping, state["A_diag"] + damping
        weight = grads[module.weight]
        if isinstance(module, nn.Embedding):
            expected = (weight.T / (g.unsqueeze(1) * a)).T
        else:
            matrix = weight.reshape(weight.shape[0], -1)
            expected = (matrix / (g.unsqueeze(1) * a[: matrix.shape[1]])).reshape(weight.shape)
        torch.testing.assert_close(moved[module.weight], expected, rtol=1e-10, atol=1e-14)
        if getattr(module, "bias", None) is not None:
            assert len(a) == weight[0].numel() + 1
            torch.testing.assert_close(moved[module.bias], grads[module.bias] / (g * a[-1]), rtol=1e-10, atol=1e-14)


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


def test_layer_configurations_the_statistics_do_not_cover_are_refused_at_build_or_fall_back():
    """Padding the statistics do not model: refused without a fallback, with the reason; with one,
    the layer falls back and explain() says why. (Grouped convolutions are covered:
    tests/test_grouped_conv.py.)"""
    with pytest.raises(opcomp.OpcompError, match="padding_mode='zeros'"):
        opcomp.build("kfac(g)", nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(opcomp.OpcompError, match="even kernel"):
        opcomp.build("kfac(g)", nn.Conv2d(2, 2, 2, padding="same"))
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), nn.Conv2d(2, 2, 3))
    opt = opcomp.build("kfac(g) | adamw", model)
    assert opt.assignments()["0.weight"] == "adamw" and opt.assignments()["1.weight"] == "kfac"
    assert "padded with 'reflect'" in opt.explain()


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


@pytest.mark.parametrize("name", ["strided_conv", "token_model"])
@pytest.mark.parametrize("micro_batches", [2, 4])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_accumulated_micro_batches_give_the_factors_of_the_whole_batch(reduction, micro_batches, name):
    """The standard accumulation: k micro-batches whose losses add up to the whole batch's (a mean
    divided by k, a sum as it is) give its A, G and EKFAC correction."""
    x, y = shapes.batch(name, 32, seed=7)  # enough rows that no factor is singular: one eigenbasis
    states = []
    for k in (1, micro_batches):
        model = shapes.make(name)
        opt = opcomp.build("ekfac[invert_every=1](g) | g", model, lr=0.0, reduction=reduction)
        for part_x, part_y in zip(x.chunk(k), y.chunk(k)):
            part = shapes.loss(model, part_x, part_y, reduction)
            (part / k if reduction == "mean" else part).backward()
        opt.step()
        states.append({n: node_state(opt, m.weight, "ekfac") for n, m in shapes.layers(model).items()})
    for layer_name, whole in states[0].items():
        for buffer in ("A", "G", "scale"):
            torch.testing.assert_close(states[1][layer_name][buffer], whole[buffer], rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("name", ["strided_conv", "token_model"])
def test_factor_averages_over_steps_of_accumulated_micro_batches_are_the_running_average_of_each_batch(name):
    """A and G after each step are decay·S + (1 − decay)·(that batch's factor), from the second
    step on folded into the product itself; each batch's factor is taken by a fresh optimizer's
    first step, which starts the average from it alone."""
    decay, expression = 0.7, "kfac[decay=0.7, invert_every=1](g) | g"
    batches = [shapes.batch(name, 16, seed=seed) for seed in range(3)]
    model = shapes.make(name)
    opt = opcomp.build(expression, model, lr=0.0)
    expected: dict = {}
    for x, y in batches:
        opt.zero_grad()
        for part_x, part_y in zip(x.chunk(2), y.chunk(2)):
            (shapes.loss(model, part_x, part_y) / 2).backward()
        opt.step()
        alone = shapes.make(name)
        first = opcomp.build(expression, alone, lr=0.0)
        shapes.loss(alone, x, y).backward()
        first.step()
        for layer_name, layer in shapes.layers(model).items():
            fresh = node_state(first, alone.get_submodule(layer_name).weight, "kfac")
            state = node_state(opt, layer.weight, "kfac")
            for buffer in ("A", "G"):
                before = expected.get((layer_name, buffer))
                now = fresh[buffer] if before is None else decay * before + (1 - decay) * fresh[buffer]
                expected[layer_name, buffer] = now
                torch.testing.assert_close(state[buffer], now, rtol=1e-9, atol=1e-14)


class SharedInputs(nn.Module):
    """Query, key (no bias) and value read one input, as in attention; two more layers read its
    halves, views of the same memory that must not be taken for it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.query, self.key, self.value = nn.Linear(6, 4), nn.Linear(6, 4, bias=False), nn.Linear(6, 4)
        self.left, self.right = nn.Linear(3, 4), nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x)
        mixed = self.query(h) * self.key(h) + self.value(h).tanh()
        return mixed + self.left(h[..., :3]) * self.right(h[..., 3:])


def test_layers_that_read_one_input_alike_share_its_factor_and_views_of_it_do_not(monkeypatch):
    """Each layer's A is the running average of mean [h, 1][h, 1]ᵀ over its own input h (the 1
    when it has a bias); query and value have one A formed once, key its own (no bias column),
    and the halves theirs."""
    import opcomp.layers.statistics as factors

    model = SharedInputs().double()
    decay, expression = 0.7, "kfac[decay=0.7, invert_every=1](g) | g"
    opt = opcomp.build(expression, model, lr=0.0)
    grams = []
    counting = factors.mean_gram
    monkeypatch.setattr(factors, "mean_gram", lambda *args, **kw: grams.append(1) or counting(*args, **kw))
    inputs = {
        "query": lambda h: h,
        "key": lambda h: h,
        "value": lambda h: h,
        "left": lambda h: h[..., :3],
        "right": lambda h: h[..., 3:],
    }
    expected: dict = {}
    for seed in range(3):
        x = torch.randn(5, 7, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        grams.clear()
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        assert len(grams) == 4 + 5  # A: one for query and value, key's, left's, right's; G: five
        for name, read in inputs.items():
            layer = model.get_submodule(name)
            rows = read(torch.tanh(x)).reshape(-1, layer.in_features)
            if layer.bias is not None:
                rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype)], dim=1)
            fresh = rows.T @ rows / len(rows)
            before = expected.get(name)
            expected[name] = fresh if before is None else decay * before + (1 - decay) * fresh
            state = node_state(opt, layer.weight, "kfac")
            torch.testing.assert_close(state["A"], expected[name], rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize(
    ("expression", "bias", "columns"),
    [("kfac(g) | g", True, "weight+bias"), ("kfac(g) | g", False, "weight"), ("muon(g) | kfac(g) | g", True, "bias")],
)
def test_conv2d_factors_with_stride_dilation_and_padding_match_patches_taken_by_hand(expression, bias, columns):
    """A from each example's patches averaged over positions, with the bias's 1 when the bias runs
    the node with the weight, that 1 alone when it runs it without; G from output gradients
    summed over positions."""
    torch.manual_seed(8)
    conv = nn.Conv2d(2, 3, kernel_size=2, stride=2, dilation=2, padding=1, bias=bias)
    model = nn.Sequential(conv, nn.Flatten(), nn.LazyLinear(4))
    x = torch.randn(3, 2, 7, 7)
    model(x)  # materialise the lazy layer before building
    opt = opcomp.build(expression, model, lr=0.0)
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
                patch = padded[n, :, top : top + 3 : 2, left : left + 3 : 2].flatten()  # 2×2 taps, dilation 2
                patches.append({"weight": patch, "weight+bias": torch.cat([patch, torch.ones(1)])}.get(columns))
        rows.append(torch.ones(1) if columns == "bias" else torch.stack(patches).mean(0))
    a = torch.stack(rows)
    d = (out.grad * 3).flatten(2).sum(2)  # per-example (mean over 3), summed over positions
    state = node_state(opt, conv.bias if columns == "bias" else conv.weight, "kfac")
    torch.testing.assert_close(state["A"], a.T @ a / 3)
    torch.testing.assert_close(state["G"], d.T @ d / 3)


class ConvsSummedAtCapture(nn.Module):
    """A strided conv with a bias, a grouped one without, and a 1×1 one called twice in a forward,
    on maps of two sizes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False)
        self.mix = nn.Conv2d(6, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.grouped(torch.relu(self.stem(x))))
        wide = torch.relu(self.mix(h))
        narrow = torch.relu(self.mix(F.max_pool2d(wide, 2)))
        return self.head(wide.mean((2, 3)) + narrow.mean((2, 3)))


@pytest.mark.parametrize("operator", ["kfac", "diag_kfac"])
def test_conv_rows_summed_as_the_gradient_arrives_give_the_factors_of_the_whole_sample(operator):
    """Under kfac and diag_kfac a conv's input and output gradient are summed over positions in the
    gradient hook and let go (ekfac keeps them: it reads every position); the factors equal those
    from the whole sample, over two accumulated micro-batches, a grouped conv and a conv called twice."""
    from opcomp.plan import Plan

    expression = f"{operator}(g) | g"
    x = torch.randn(2, 5, 3, 9, 9, generator=torch.Generator().manual_seed(6))
    y = torch.tensor([[0, 1, 2, 0, 1], [2, 2, 1, 0, 0]])
    states = []
    for summing in (True, False):
        model = ConvsSummedAtCapture()
        with patch.object(Plan, "summed_at_capture", return_value={}) if not summing else nullcontext():
            opt = opcomp.build(expression, model, lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            for batch, labels in zip(x, y):
                (F.cross_entropy(model(batch), labels) / 2).backward()
            entries = opt._capture.entries[model.mix] + opt._capture.entries[model.grouped]
            assert len(entries) == 6
            assert all((e.input is None and e.grad is None) == summing for e in entries)
            opt.step()
        states.append([node_state(opt, conv.weight, operator) for conv in (model.stem, model.grouped, model.mix)])
    for summed, whole in zip(*states):
        assert summed.keys() == whole.keys()
        for name in summed:
            torch.testing.assert_close(summed[name], whole[name], rtol=1e-5, atol=1e-7)
    ekfac = opcomp.build("ekfac(g) | g", model := ConvsSummedAtCapture(), lr=0.1)
    F.cross_entropy(model(x[0]), y[0]).backward()
    assert all(e.grad is not None and e.summed is None for e in ekfac._capture.entries[model.stem])


def test_conv_rows_summed_under_activation_checkpointing_equal_those_held_to_the_step():
    """A checkpointed block runs its convs again in the backward: summing at the gradient still
    gives the factors of the records held whole."""
    from opcomp.plan import Plan

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.block = nn.Sequential(
                nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)
            )
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False).mean((2, 3)))

    x, y = torch.randn(6, 3, 9, 9, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3, 0, 1])
    factors = []
    for summing in (True, False):
        model = Checkpointed()
        with patch.object(Plan, "summed_at_capture", return_value={}) if not summing else nullcontext():
            opt = opcomp.build("kfac(g) | g", model, lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        factors.append([node_state(opt, model.block[i].weight, "kfac")[name] for i in (0, 2) for name in "AG"])
    for summed, whole in zip(*factors):
        torch.testing.assert_close(summed, whole, rtol=1e-5, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    extra=st.tuples(st.integers(0, 5), st.integers(0, 5)),
    examples=st.integers(1, 3),
    channels=st.integers(1, 3),
)
def test_patch_means_are_the_unfolded_patches_averaged_over_positions(
    kernel, stride, dilation, padding, extra, examples, channels
):
    """For any geometry whose output is not empty: what KFAC's A reads of a Conv2d, the tap sums
    formed by one product with the 0/1 selectors' Kronecker product or from sums over the
    strides' phases and the borders, equals ``F.unfold``'s patches averaged over positions."""
    from opcomp.layers.samples import patch_means, selectors, tap_sums_by_phases, tap_sums_in_one

    conv = nn.Conv2d(channels, 2, kernel, stride=stride, dilation=dilation, padding=padding)
    reach = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
    height, width = (max(1, r - 2 * p) + e for r, p, e in zip(reach, padding, extra))
    x = torch.randn(examples, channels, height, width, dtype=torch.float64)
    expected = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride).mean(2)
    positions = selectors(x, conv)[2]
    torch.testing.assert_close(patch_means(x, conv), expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(tap_sums_by_phases(x, conv) / positions, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(tap_sums_in_one(x, conv) / positions, expected, rtol=1e-12, atol=1e-14)


def test_patch_means_take_the_phases_on_a_large_map_and_one_product_on_a_small_one():
    """Past :data:`ONE_PRODUCT` the means come from the phase sums, below it from the one product;
    both agree with unfolding (a strided map whose size is not a multiple of the stride)."""
    from opcomp.layers import samples

    conv = nn.Conv2d(2, 2, 3, stride=2, padding=1)
    for side, unused in ((33, "tap_sums_in_one"), (5, "tap_sums_by_phases")):  # the one patched out raises
        x = torch.randn(2, 2, side, side + 2, dtype=torch.float64)
        expected = F.unfold(x, 3, padding=1, stride=2).mean(2)
        with patch.object(samples, unused, side_effect=AssertionError(f"{unused} on a {side}-high map")):
            torch.testing.assert_close(samples.patch_means(x, conv), expected, rtol=1e-12, atol=1e-14)


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


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_a_dropped_or_closed_optimizer_leaves_no_hooks_on_the_model():
    import gc

    model = mlp()
    x, y = data(8)
    for _ in range(20):  # rebuilding each epoch, as a sweep or a notebook does
        opt = opcomp.build("fog", model)
        train(model, opt, [(x, y)])
    del opt
    gc.collect()
    assert hook_count(model) == 0
    opt = opcomp.build("kfac[mc](g)", model, likelihood="categorical")
    assert hook_count(model) > 0
    opt.close()
    assert hook_count(model) == 0
    F.cross_entropy(model(x), y).backward()  # nothing is recorded any more
    assert all(not entries for entries in opt._capture.entries.values())


def test_a_dropped_monte_carlo_optimizer_runs_no_extra_backward_through_other_hooks():
    model = mlp()
    x, y = data(8)
    fired = []

    def watch(module, args, output):  # another library's tensor hook on a layer output
        output.register_hook(lambda grad: fired.append(1))

    model[0].register_forward_hook(watch)
    opt = opcomp.build("kfac[mc](g)", model, likelihood="categorical")
    F.cross_entropy(model(x), y).backward()
    assert len(fired) == 2  # the sampled-label backward and the user's
    opt.step()
    del opt
    fired.clear()
    F.cross_entropy(model(x), y).backward()
    assert len(fired) == 1


def test_monte_carlo_labels_are_drawn_over_the_dimension_the_loss_treats_as_classes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 3))  # logits (N, T, C): classes last
    x, y = torch.randint(0, 7, (4, 5)), torch.randint(0, 3, (4, 5))
    opt = opcomp.build("kfac[mc](g) | g", model, lr=0.1, likelihood="categorical")  # classes on dim 1 by default
    F.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1)).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(opcomp.OpcompError, match="sums to zero over dim 2.*build with class_dim=2"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and not opt.state
    opt.close()
    opt = opcomp.build("kfac[mc](g) | g", model, lr=0.1, likelihood="categorical", class_dim=-1)
    F.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1)).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_an_eigendecomposition_that_fails_in_fp32_is_done_again_in_fp64(monkeypatch):
    """LAPACK's eigh can fail to converge on a large, rank-deficient fp32 factor (ResNet-18's
    2304-wide conv inputs at the first step); the step then decomposes in fp64, same result."""
    x, y = data(16, seed=5)
    eigh = torch.linalg.eigh

    def fails_in_fp32(matrix, *args, **kwargs):
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: the algorithm failed to converge")
        return eigh(matrix, *args, **kwargs)

    moved = []
    for failing in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))
        opt = opcomp.build("ekfac[damping=0.01](g)", model, lr=1.0)
        before = [p.detach().clone() for p in model.parameters()]
        F.cross_entropy(model(x), y.clamp(max=4)).backward()
        if failing:
            monkeypatch.setattr(torch.linalg, "eigh", fails_in_fp32)
        opt.step()
        moved.append(torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())]))
    torch.testing.assert_close(moved[1], moved[0], rtol=1e-4, atol=1e-6)


def step_difference(name: str, expression: str, steps: int = 3) -> tuple[torch.Tensor, nn.Module, object]:
    """The parameter change of the last of ``steps`` steps at a small lr (fp32 model and data)."""
    model = shapes.make(name, dtype=torch.float32)
    x, y = shapes.batch(name, 64, dtype=torch.float32)
    opt = opcomp.build(expression, model, lr=1e-4)
    for _ in range(steps):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        shapes.loss(model, x, y).backward()
        opt.step()
    change = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    return change, model, opt


@pytest.mark.parametrize("name", ["mlp", "strided_conv", "token_model"])
@pytest.mark.parametrize("operator", ["kfac[{}]", "kfac[damping_mode=exact, {}]", "ekfac[{}]"])
def test_bf16_products_stay_within_bfloat16_rounding_of_the_fp32_operator(name, operator):
    """``bf16`` rounds the inputs and results of the per-step products to bfloat16 (8 significant
    bits); the factors are averaged and decomposed in fp32. Measured on these shapes after three
    steps: factors within 0.25%, the step's direction within 0.5–6% (the inverses' rounding weighs
    most). A product left in fp32 would make them equal; a lost scale or transpose differs by order 1."""
    exact, model, opt = step_difference(name, operator.format("bf16=false") + "(g) | g")
    low, model_low, opt_low = step_difference(name, operator.format("bf16=true") + "(g) | g")
    difference = (low - exact).norm() / exact.norm()
    assert 1e-4 < difference < 0.1
    op = operator.split("[")[0]
    for layer_name, layer in shapes.layers(model).items():
        fp32 = node_state(opt, layer.weight, op)
        bf16 = node_state(opt_low, model_low.get_submodule(layer_name).weight, op)
        for factor in ("A", "G"):
            assert (bf16[factor] - fp32[factor]).norm() <= 0.01 * fp32[factor].norm(), (layer_name, factor)
            assert bf16[factor].dtype == torch.float32
        if "A_inv" in bf16 and bf16["A_inv"].ndim == 2:
            assert bf16["A_inv"].dtype == torch.bfloat16  # stored as every product rounds it
