"""fog and diagfog (muon over KFAC or diagonal KFAC, AdamW elsewhere) train on real data."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import opcomp
from opcomp.comparison import data, models


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.mark.parametrize("preset", ["fog", "diagfog"])
def test_preset_trains_a_small_cnn_on_digits(preset):
    train, _ = data.digits()
    torch.manual_seed(0)
    model = models.cnn()
    opt = opcomp.build(preset, model, lr=0.03)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(30):
        index = torch.randint(0, len(train.y), (64,), generator=generator)
        opt.zero_grad()
        loss = F.cross_entropy(model(train.x[index]), train.y[index])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert mean(losses[-5:]) < 0.85 * mean(losses[:5])
    statistic = "kfac" if preset == "fog" else "diag_kfac"
    assert opt.assignments() == {
        "0.weight": f"muon ← {statistic}",
        "0.bias": "0.1 × adamw",
        "2.weight": f"muon ← {statistic}",
        "2.bias": "0.1 × adamw",
        "5.weight": "0.1 × adamw",  # the output head
        "5.bias": "0.1 × adamw",
    }


@pytest.mark.parametrize("preset", ["fog", "diagfog"])
def test_preset_trains_a_small_character_transformer_on_python_help_text(preset):
    text = data.pydoc_text(100_000)
    statistic = "kfac" if preset == "fog" else "diag_kfac"
    torch.manual_seed(0)
    model = models.CharTransformer(len(text.alphabet), width=32, heads=4, depth=2, length=32)
    opt = opcomp.build(preset, model, lr=0.03)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(30):
        x, y = text.windows(16, 32, generator)
        opt.zero_grad()
        loss = F.cross_entropy(model(x).reshape(-1, len(text.alphabet)), y.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert mean(losses[-5:]) < 0.85 * mean(losses[:5])
    runs = opt.assignments()
    assert runs["blocks.0.norm1.weight"] == runs["blocks.0.query.bias"] == "0.1 × adamw"
    assert runs["tokens.weight"] == runs["head.weight"] == "0.1 × adamw"  # the embedding and the output head
    assert runs["blocks.0.query.weight"] == runs["blocks.1.down.weight"] == f"muon ← {statistic}"
