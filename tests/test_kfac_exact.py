"""KFAC against explicit Fisher blocks built independently, in the cases where theory says it is exact."""

from __future__ import annotations

import pytest
import torch
from fisher import block_vectors, empirical_fisher, gauss_newton_block, node_state, per_example_gradients
from torch import nn
from torch.nn import functional as F

import opcomp

LOSSES = {
    "mse": lambda out, y, reduction: F.mse_loss(out, y, reduction=reduction),
    "ce": lambda out, y, reduction: F.cross_entropy(out, y, reduction=reduction),
}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def repeated_batch(size: int, loss: str):
    """One input repeated over the batch, each copy with its own label."""
    generator = torch.Generator().manual_seed(size)
    x = torch.randn(1, 4, generator=generator).expand(size, 4).clone()
    y = (
        torch.randn(size, 3, generator=generator)
        if loss == "mse"
        else torch.randint(0, 3, (size,), generator=generator)
    )
    return x, y


def one_step(model, expression, x, y, loss, reduction, lr=1e-2, **build):
    opt = opcomp.build(expression, model, lr=lr, reduction=reduction, **build)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    LOSSES[loss](model(x), y, reduction).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    directions = {n: (before[n] - p.detach()) / lr for n, p in model.named_parameters()}
    return opt, grads, directions


def joined(tensors: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
    weight = tensors[f"{layer}.weight"]
    return torch.cat([weight.reshape(weight.shape[0], -1), tensors[f"{layer}.bias"].unsqueeze(1)], 1).flatten()


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("size", [1, 3, 8])
def test_kfac_blocks_equal_the_empirical_fisher_for_one_repeated_input(loss, reduction, size):
    model = mlp()
    x, y = repeated_batch(size, loss)
    examples = per_example_gradients(model, lambda out, t: LOSSES[loss](out, t, reduction), x, y)
    damping = 0.1
    opt, grads, directions = one_step(model, f"kfac[damping_mode=exact, damping={damping}](g)", x, y, loss, reduction)
    for layer in ("0", "2"):
        fisher = empirical_fisher(block_vectors(examples, layer))
        state = node_state(opt, model.get_submodule(layer).weight, "kfac")
        kronecker = torch.kron(state["G"], state["A"])
        torch.testing.assert_close(kronecker, fisher, rtol=1e-5, atol=1e-5 * fisher.abs().max().item())
        gradient = joined(grads, layer)
        expected = torch.linalg.solve(fisher + damping * torch.eye(fisher.shape[0]), gradient)
        torch.testing.assert_close(
            joined(directions, layer), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item()
        )


def test_kfac_block_of_one_datum_through_a_deeper_network_with_biases():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))
    x, y = torch.randn(1, 3), torch.randint(0, 2, (1,))
    examples = per_example_gradients(model, lambda out, t: F.cross_entropy(out, t), x, y)
    opt, _, _ = one_step(model, "kfac[damping_mode=exact](g)", x, y, "ce", "mean")
    for layer in ("0", "2", "4"):
        state = node_state(opt, model.get_submodule(layer).weight, "kfac")
        fisher = empirical_fisher(block_vectors(examples, layer))
        torch.testing.assert_close(torch.kron(state["G"], state["A"]), fisher, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [1, 4])
def test_conv2d_kfac_is_exact_with_average_pooling_and_one_repeated_input(size):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))
    x = torch.randn(1, 2, 5, 5).expand(size, 2, 5, 5).clone()
    y = torch.randint(0, 4, (size,), generator=torch.Generator().manual_seed(3))
    examples = per_example_gradients(model, lambda out, t: F.cross_entropy(out, t), x, y)
    damping = 0.05
    opt, grads, directions = one_step(model, f"kfac[damping_mode=exact, damping={damping}](g)", x, y, "ce", "mean")
    for layer in ("0", "3"):
        state = node_state(opt, model.get_submodule(layer).weight, "kfac")
        fisher = empirical_fisher(block_vectors(examples, layer))
        torch.testing.assert_close(torch.kron(state["G"], state["A"]), fisher, rtol=1e-5, atol=1e-6)
        expected = torch.linalg.solve(fisher + damping * torch.eye(fisher.shape[0]), joined(grads, layer))
        torch.testing.assert_close(
            joined(directions, layer), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item()
        )


def test_monte_carlo_fisher_approaches_the_gauss_newton_block_of_a_deep_linear_network():
    errors = []
    for size in (16, 256, 4096):
        torch.manual_seed(4)
        model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.Linear(6, 5, bias=False), nn.Linear(5, 3, bias=False))
        x = torch.randn(1, 4).expand(size, 4).clone()
        opt = opcomp.build("kfac[fisher=mc](g)", model, lr=0.0, likelihood="gaussian")
        torch.manual_seed(5)  # the sampled labels
        F.mse_loss(model(x), torch.zeros(size, 3)).backward()
        opt.step()
        state = node_state(opt, model[1].weight, "kfac")
        exact = gauss_newton_block(model, x[:1], "1")
        sampled = torch.kron(state["G"], state["A"])
        errors.append((torch.linalg.norm(sampled - exact) / torch.linalg.norm(exact)).item())
    assert errors[0] > errors[1] > errors[2]  # seen: 1.30, 0.155, 0.027, falling as 1/√samples
    assert errors[2] < 0.1


def repeated_shapes() -> nn.Module:
    """Two hidden layers of one shape, which KFAC preconditions in one batch."""
    torch.manual_seed(0)
    layers = [nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)]
    return nn.Sequential(*layers)


@pytest.mark.parametrize(("make", "layers"), [(mlp, ("0", "2")), (repeated_shapes, ("0", "2", "4", "6"))])
def test_kfac_factored_damping_follows_its_formula(make, layers):
    model = make()
    x, y = repeated_batch(6, "ce")
    x = x + 0.3 * torch.randn_like(x)  # not exact: the formula is what is checked
    damping = 0.01
    opt, grads, directions = one_step(model, f"kfac[damping={damping}](g)", x, y, "ce", "mean")
    for layer in layers:
        state = node_state(opt, model.get_submodule(layer).weight, "kfac")
        a, g = state["A"], state["G"]
        pi = ((a.trace() / a.shape[0]) / (g.trace() / g.shape[0])).sqrt()
        lambda_a, lambda_g = pi * damping**0.5, damping**0.5 / pi
        gradient = joined(grads, layer).reshape(g.shape[0], a.shape[0])
        expected = torch.linalg.solve(g + lambda_g * torch.eye(g.shape[0]), gradient) @ torch.linalg.inv(
            a + lambda_a * torch.eye(a.shape[0])
        )
        torch.testing.assert_close(joined(directions, layer), expected.flatten(), rtol=1e-4, atol=1e-6)
