"""Training tasks on packaged data: a model, random training batches, a fixed batch to measure on.

Every optimizer compared on a task sees the same model initialisation (seeded) and the same
sequence of batches (a seeded generator), so differences come from the optimizer alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from opcomp.bench import data, models


@dataclass
class Task:
    name: str
    build_model: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple[Tensor, Tensor]]  # a random training batch
    measure: tuple[Tensor, Tensor]  # a fixed batch: losses compared before and after training
    loss: Callable[[nn.Module, Tensor, Tensor], Tensor]

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build_model()


def classification_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y)


def next_character_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def digits(batch: int = 64) -> Task:
    """The small CNN on scikit-learn's 8×8 digits."""
    train, _ = data.digits()

    def sample(generator: torch.Generator) -> tuple[Tensor, Tensor]:
        index = torch.randint(0, len(train.y), (batch,), generator=generator)
        return train.x[index], train.y[index]

    return Task("digits", models.cnn, sample, (train.x[:256], train.y[:256]), classification_loss)


def pydoc(batch: int = 16, length: int = 32) -> Task:
    """The small character transformer on Python's help topics."""
    text = data.pydoc_text(100_000)

    def sample(generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return text.windows(batch, length, generator)

    fixed = text.windows(64, length, torch.Generator().manual_seed(12345))
    vocabulary = len(text.alphabet)
    return Task(
        "pydoc",
        lambda: models.CharTransformer(vocabulary, width=32, heads=4, depth=2, length=length),
        sample,
        fixed,
        next_character_loss,
    )


TASKS: dict[str, Callable[[], Task]] = {"digits": digits, "pydoc": pydoc}
