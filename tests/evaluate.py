"""Run an expression once on given gradients and read back its direction."""

from __future__ import annotations

import torch
from torch import Tensor, nn

import opcomp


def direction(expression: str, *grads: Tensor) -> list[Tensor]:
    """The update direction u of one step: parameters start at zero and lr = 1, so u = −p exactly."""
    params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    opt = opcomp.build(expression, params, lr=1.0)
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    opt.step()
    return [-param.detach() for param in params]
