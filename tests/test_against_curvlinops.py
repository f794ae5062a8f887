"""Layer statistics and curvature products against curvlinops (an independent library), in float64,
on the layer shapes users have: an MLP, a stride-2 padded and a dilated Conv2d, and a sequence
model whose Linear layers see every token (its logits laid out (N, C, T) for ``F.cross_entropy``).

One convention differs, by definition: opcomp's factors are per-example averages whatever the
loss reduction (docs/operators.md: ℓ_n is the loss of example n, G = E_n[δ_n δ_nᵀ]); curvlinops
approximates the curvature of the loss as written, per loss term for a mean and summed for a sum.
So curvlinops' G is opcomp's times T (tokens per example) for a token-mean loss and times N for a
summed one; A agrees as it is. Every comparison below states that factor and nothing else.
"""

from __future__ import annotations

import pytest
import torch
from curvlinops import EKFACLinearOperator, GGNLinearOperator, HessianLinearOperator, KFACLinearOperator
from fisher import node_state
from shapes import TOKENS, batch, layers, loss, make
from torch import nn

import opcomp

SHAPES = ["mlp", "strided_conv", "token_model"]


def convention(name: str, reduction: str, examples: int) -> float:
    """curvlinops' G over opcomp's: loss terms per example (mean) or examples (sum)."""
    if reduction == "sum":
        return float(examples)
    return float(TOKENS) if name == "token_model" else 1.0


def approximation(name: str) -> str:
    """opcomp's: expand for Linear layers (every position a row), reduce for Conv2d."""
    return "reduce" if name == "strided_conv" else "expand"


def step_once(expression: str, name: str, reduction: str, size: int = 32, **build):
    model = make(name)
    x, y = batch(name, size)
    opt = opcomp.build(expression, model, lr=0.0, reduction=reduction, **build)
    loss(model, x, y, reduction).backward()
    opt.step()
    opt.close()  # its hooks would see curvlinops' own passes
    return model, opt, x, y


def kronecker_reference(operator, model, params, x, y, reduction="mean", fisher="empirical", approx="expand"):
    """curvlinops' KFAC or EKFAC of these parameters, the bias folded in as opcomp folds it."""
    return operator(
        model,
        nn.CrossEntropyLoss(reduction=reduction),
        params,
        [(x, y)],
        fisher_type=fisher,
        kfac_approx=approx,
        separate_weight_and_bias=False,
        check_deterministic=False,
    )


def joint(matrix: torch.Tensor, out: int, columns: int) -> torch.Tensor:
    """A matrix over vec X (X = [W | b] row-major) reordered to curvlinops' order: W flattened, then b."""
    inputs = columns - 1
    order = [o * columns + i for o in range(out) for i in range(inputs)] + [o * columns + inputs for o in range(out)]
    order = torch.tensor(order)
    return matrix[order][:, order]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", SHAPES)
def test_kfac_factors_equal_curvlinops(name, reduction):
    model, opt, x, y = step_once("kfac(g) | g", name, reduction)
    found = layers(model)
    params = [p for layer in found.values() for p in layer.parameters()]
    reference = kronecker_reference(KFACLinearOperator, model, params, x, y, reduction, approx=approximation(name))
    reference.compute_kronecker_factors()
    factors = reference.state_dict()
    factor = convention(name, reduction, len(x))
    for layer_name, layer in found.items():
        state = node_state(opt, layer.weight, "kfac")
        torch.testing.assert_close(state["A"], factors["input_covariances"][layer_name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            factor * state["G"], factors["gradient_covariances"][layer_name], rtol=1e-10, atol=1e-12
        )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", ["mlp", "strided_conv"])
def test_ekfac_equals_curvlinops_ekfac_right_after_its_refresh(name, reduction):
    """EKFAC as a matrix, Q diag(s) Qᵀ, against curvlinops' (which supports 2-d outputs only; the
    sequence model is checked against per-example gradients in test_kfac_family)."""
    model, opt, x, y = step_once("ekfac[invert_every=1](g) | g", name, reduction)
    factor = convention(name, reduction, len(x))
    for layer in layers(model).values():
        params = list(layer.parameters())
        reference = kronecker_reference(EKFACLinearOperator, model, params, x, y, reduction, approx=approximation(name))
        size = sum(p.numel() for p in params)
        expected = reference @ torch.eye(size, dtype=torch.float64)
        state = node_state(opt, layer.weight, "ekfac")
        basis = torch.kron(state["Q_G"], state["Q_A"])
        ours = joint(basis @ torch.diag(state["scale"].flatten()) @ basis.T, *state["scale"].shape)
        torch.testing.assert_close(factor * ours, expected, rtol=1e-9, atol=1e-12)


class Segmenter(nn.Module):
    """Per-pixel logits (N, C, H, W), laid out as F.cross_entropy takes them."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(2, 4, 3, padding=1)
        self.classes = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.classes(torch.tanh(self.features(x)))


@pytest.mark.parametrize("name", ["token_model", "segmenter"])
def test_monte_carlo_fisher_averages_to_curvlinops_exact_type2_factor(name):
    """Labels are sampled over the class dimension the loss uses and each position gets 1/positions
    of a mean: G from many samples approaches the exact expectation (curvlinops' type-2 Fisher)."""
    if name == "segmenter":
        torch.manual_seed(0)
        model, positions = Segmenter().double(), 25
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(4, 2, 5, 5, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 3, (4, 5, 5), generator=generator)
    else:
        model, positions = make(name), TOKENS
        x, y = batch(name, 8)
    opt = opcomp.build("kfac[fisher=mc](g) | g", model, lr=0.0, likelihood="categorical")
    torch.manual_seed(2)
    samples = 512  # micro-batches of one step: their statistics average
    for _ in range(samples):
        (loss(model, x, y) / samples).backward()
    opt.step()
    opt.close()
    for layer_name, layer in layers(model).items():
        reference = kronecker_reference(KFACLinearOperator, model, list(layer.parameters()), x, y, fisher="type-2")
        reference.compute_kronecker_factors()
        expected = reference.state_dict()["gradient_covariances"][layer_name]
        ours = positions * node_state(opt, layer.weight, "kfac")["G"]
        error = torch.linalg.norm(ours - expected) / torch.linalg.norm(expected)
        assert error < 0.15, (layer_name, float(error))  # Monte Carlo noise; a T or T² slip is far off


@pytest.mark.parametrize("name", ["strided_conv", "token_model"])
@pytest.mark.parametrize("operator", ["gnvp", "hvp"])
def test_curvature_products_equal_curvlinops(name, operator):
    model = make(name)
    x, y = batch(name, 8)
    params = list(model.parameters())
    grads = torch.autograd.grad(loss(model, x, y), params)
    vector = torch.cat([g.reshape(-1) for g in grads])
    reference = (GGNLinearOperator if operator == "gnvp" else HessianLinearOperator)(
        model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False
    )
    expected = reference @ vector
    opt = opcomp.build(f"{operator}(g)", model, lr=1.0)
    before = [p.detach().clone() for p in params]
    opt.step(lambda: loss(model, x, y))
    found = torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(before, params)])  # u at lr 1
    torch.testing.assert_close(found, expected, rtol=1e-9, atol=1e-12)


class OneHotTokens(nn.Module):
    """The token model with its Embedding written as what it computes: a Linear on one-hot tokens."""

    def __init__(self, tokens: nn.Module) -> None:
        super().__init__()
        self.embed = nn.Linear(tokens.embed.num_embeddings, tokens.embed.embedding_dim, bias=False).double()
        with torch.no_grad():
            self.embed.weight.copy_(tokens.embed.weight.T)
        self.rest = tokens

    def forward(self, x):
        hidden = self.embed(nn.functional.one_hot(x, self.embed.in_features).double())
        return self.rest.head(torch.tanh(self.rest.hidden(hidden))).transpose(1, 2)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_embedding_factors_equal_curvlinops_on_the_equivalent_one_hot_linear(reduction):
    """curvlinops has no Embedding; an Embedding is a Linear on one-hot inputs, whose A is diagonal."""
    model, opt, x, y = step_once("kfac(g) | g", "token_model", reduction)
    equivalent = OneHotTokens(model)
    reference = kronecker_reference(
        KFACLinearOperator, equivalent, [equivalent.embed.weight], x, y, reduction, approx="expand"
    )
    reference.compute_kronecker_factors()
    factors = reference.state_dict()
    a, g = factors["input_covariances"]["embed"], factors["gradient_covariances"]["embed"]
    state = node_state(opt, model.embed.weight, "kfac")
    torch.testing.assert_close(torch.diag(state["A"]), a, rtol=1e-10, atol=1e-12)  # one-hot: diagonal
    torch.testing.assert_close(convention("token_model", reduction, len(x)) * state["G"], g, rtol=1e-10, atol=1e-12)
