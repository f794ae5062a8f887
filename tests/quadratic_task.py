"""A task whose best learning rate is known in closed form, for the tuner and time to target.

L(w) = ½‖w − c‖² with the plain gradient (``g``, a constant lr): each step multiplies w − c by
(1 − lr), so after T steps L = L₀·(1 − lr)^{2T}. On the grid lr₀·3^k the best lr is the one with
the smallest |1 − lr|, and L ≤ target first holds at T = ⌈log(target/L₀) / (2·log|1 − lr|)⌉.
"""

from __future__ import annotations

import torch
from torch import nn

import opcomp

CENTER = torch.tensor([2.0, 0.0, 0.0, 0.0])  # L₀ = ½‖c‖² = 2 from w = 0


class Point(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4))


def quadratic(model: Point, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (model.w - CENTER).pow(2).sum()


def task() -> opcomp.Task:
    """The quadratic as a Task: batches carry nothing, validation is the loss itself."""
    nothing = (torch.zeros(1, 1), torch.zeros(1))
    return opcomp.Task(
        "quadratic", Point, lambda generator: nothing, nothing, nothing,
        loss=quadratic, metric="loss", target=1e-3, build_options={},
    )  # fmt: skip


def not_a_task() -> int:
    return 3
