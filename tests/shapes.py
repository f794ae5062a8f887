"""Small models with the layer shapes users have, and seeded data for them.

- ``mlp``: Linear → Tanh → Linear on (N, 5) inputs, logits (N, 3);
- ``strided_conv``: a stride-2 padded Conv2d, a dilated Conv2d, average pooling and a Linear head;
- ``token_model``: Embedding → Linear → Tanh → Linear over sequences, logits laid out (N, C, T) as
  ``F.cross_entropy`` takes them (the loss averages N·T tokens);
- :class:`ClassifierFirst`: an MLP on (N, 8) whose head is registered before its body.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

VOCABULARY, CLASSES, TOKENS = 7, 3, 5


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCABULARY, 4)
        self.hidden = nn.Linear(4, 6)
        self.head = nn.Linear(6, CLASSES)

    def forward(self, tokens):
        return self.head(torch.tanh(self.hidden(self.embed(tokens)))).transpose(1, 2)  # (N, C, T)


class ClassifierFirst(nn.Module):
    """The classifier registered before the body (``classifier_first``): registration order
    guesses the wrong output head, which the model's first forward corrects."""

    def __init__(self, hidden: int = 16, classes: int = 4, classifier_first: bool = True) -> None:
        super().__init__()
        if classifier_first:
            self.classifier = nn.Linear(hidden, classes)
        self.body = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        if not classifier_first:
            self.classifier = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.classifier(self.body(x))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, CLASSES))


def strided_conv() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, kernel_size=2, dilation=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, CLASSES),
    )


def token_model() -> nn.Module:
    return TokenModel()


MODELS = {"mlp": mlp, "strided_conv": strided_conv, "token_model": token_model}


def make(name: str, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]().to(dtype)


def batch(name: str, size: int = 16, seed: int = 1, dtype: torch.dtype = torch.float64):
    generator = torch.Generator().manual_seed(seed)
    if name == "token_model":
        x = torch.randint(0, VOCABULARY, (size, TOKENS), generator=generator)
        return x, torch.randint(0, CLASSES, (size, TOKENS), generator=generator)
    shape = (size, 5) if name == "mlp" else (size, 2, 8, 8)
    return torch.randn(shape, generator=generator, dtype=dtype), torch.randint(0, CLASSES, (size,), generator=generator)


def loss(model: nn.Module, x, y, reduction: str = "mean"):
    return F.cross_entropy(model(x), y, reduction=reduction)


def layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers with KFAC statistics, by name (Linear and Conv2d; the Embedding apart)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
