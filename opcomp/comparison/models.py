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


def cnn(channels: int = 1, classes: int = 10, width: int = 16, side: int = 8, batch_norm: bool = False) -> nn.Module:
    """Two 3×3 convolutions (the second strided) and a linear classifier; with ``batch_norm``, a
    BatchNorm2d after each convolution.

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
    if batch_norm:
        layers.insert(3, nn.BatchNorm2d(2 * width))
        layers.insert(1, nn.BatchNorm2d(width))
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


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3×3 convolutions with batch norm, a 1×1 downsample
    where the shape changes."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.downsample = None
        if stride != 1 or inputs != outputs:
            self.downsample = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """torchvision's ResNet with BasicBlocks, module names included (``conv1``, ``layer1.0.conv1``,
    ``fc``): a 7×7/2 stem and max pool, one stage per width (the first at stride 1, the others 2),
    average pool, linear classifier. ``resnet18`` is widths 64–512, two blocks a stage. Built here
    because torchvision's wheel does not load against every torch build."""

    def __init__(self, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), classes: int = 10, channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inputs = widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks), 1):
            stride = 1 if stage == 1 else 2
            layers = [BasicBlock(inputs if i == 0 else width, width, stride if i == 0 else 1) for i in range(count)]
            self.add_module(f"layer{stage}", nn.Sequential(*layers))
            inputs = width
        self.stages = len(widths)
        self.fc = nn.Linear(inputs, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for stage in range(1, self.stages + 1):
            x = getattr(self, f"layer{stage}")(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet18(classes: int = 10, channels: int = 3) -> ResNet:
    return ResNet(classes=classes, channels=channels)


def small_resnet(classes: int = 10, channels: int = 3) -> ResNet:
    """The same design at widths 32, 64, 128, one block a stage: 309k parameters, BatchNorm after
    every convolution, 28×28 images reach the last stage at 2×2."""
    return ResNet(widths=(32, 64, 128), blocks=(1, 1, 1), classes=classes, channels=channels)


class Logits(nn.Module):
    """A Hugging Face language model seen as tokens → logits, as the tasks' losses read models."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, use_cache=False).logits


def gpt2_lm(vocabulary: int, length: int, layers: int = 4, width: int = 128, heads: int = 4) -> nn.Module:
    """Hugging Face's GPT2LMHeadModel (tied head), random init, no dropout; transformers is a test
    extra."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError("GPT-2 needs transformers: pip install 'opcomp[test]'") from error
    config = transformers.GPT2Config(
        vocab_size=vocabulary,
        n_positions=length,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def gpt2(vocabulary: int, length: int) -> nn.Module:
    """The gpt2 task's model: a small GPT-2, tokens → logits."""
    return Logits(gpt2_lm(vocabulary, length))
