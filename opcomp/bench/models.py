"""Small models for comparisons and tests, built only from layers opcomp's statistics support.

The transformer writes attention with explicit ``nn.Linear`` projections (nn.MultiheadAttention
reads its projection weights without calling their modules, so hooks on them would see nothing).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def mlp(inputs: int, hidden: int, classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(inputs, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )


def cnn(channels: int = 1, classes: int = 10, width: int = 16, side: int = 8) -> nn.Module:
    """Two 3×3 convolutions (the second strided) and a linear classifier.

    Inputs larger than 8×8 are average-pooled to 4×4 first, which keeps the classifier (and its
    KFAC input factor) at 512 inputs whatever the image size.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(channels, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * width * 16, classes),
    ]
    if side != 8:
        layers.insert(4, nn.AdaptiveAvgPool2d(4))
    return nn.Sequential(*layers)


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        h = self.norm1(x)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            split(self.query(h)), split(self.key(h)), split(self.value(h)), is_causal=True
        )
        x = x + self.out(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class CharTransformer(nn.Module):
    """A small GPT-like character model: token and position embeddings, blocks, a linear head."""

    def __init__(self, vocabulary: int, width: int = 64, heads: int = 4, depth: int = 2, length: int = 64) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocabulary, width)
        self.positions = nn.Embedding(length, width)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocabulary)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(
                    module.weight,
                    std=0.02 if isinstance(module, nn.Embedding) else 1 / math.sqrt(module.weight.shape[1]),
                )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.head(self.norm(self.blocks(self.tokens(tokens) + self.positions(positions))))
