"""Independent references for layer statistics: per-example gradients with torch.func, explicit blocks."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap


def per_example_gradients(model: nn.Module, loss_one, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """∇ℓ_n for every example n, ℓ_n = loss_one(model(x_n), y_n) on that example alone."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return loss_one(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def block_vectors(grads: dict[str, torch.Tensor], layer: str, with_bias: bool = True) -> torch.Tensor:
    """Per-example [∇W | ∇b] of a layer, flattened row-major: (examples, out·(in + 1))."""
    weight = grads[f"{layer}.weight"]
    matrix = weight.reshape(weight.shape[0], weight.shape[1], -1)
    if with_bias:
        matrix = torch.cat([matrix, grads[f"{layer}.bias"].unsqueeze(2)], dim=2)
    return matrix.flatten(1)


def empirical_fisher(vectors: torch.Tensor) -> torch.Tensor:
    """F = (1/N) Σ_n v_n v_nᵀ."""
    return vectors.T @ vectors / vectors.shape[0]


def gauss_newton_block(model: nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    """Jᵀ J for the layer's weight (H_L = I: the loss ½‖f − y‖²), summed over examples / N."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    name = f"{layer}.weight"

    def output(w, xi):
        return functional_call(model, {**params, name: w}, (xi.unsqueeze(0),)).squeeze(0)

    jacobians = vmap(jacrev(output), in_dims=(None, 0))(params[name], x)  # (N, outputs, *weight)
    flat = jacobians.flatten(2)
    return torch.einsum("noi,noj->ij", flat, flat) / x.shape[0]


def node_state(opt, param: torch.Tensor, operator: str) -> dict:
    """The state entry of the one ``operator`` node in ``param``'s state."""
    (entry,) = [v for k, v in opt.state[param].items() if k.startswith(f"{operator}[")]
    return entry
