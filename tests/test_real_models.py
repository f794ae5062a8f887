"""opcomp on the models people train: Hugging Face GPT-2 and ViT (tiny configs, random init, no
downloads), nn.MultiheadAttention, and torchvision's ResNet layout (its wheel does not load
against this torch, so opcomp.comparison.models builds it as torchvision does)."""

from __future__ import annotations

import copy
import warnings

import hf
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import opcomp
from opcomp.comparison.models import ResNet


def trains(model: nn.Module, expression: str, closure, steps: int = 6, lr: float | None = None) -> tuple[float, float]:
    """(first loss, last loss) of ``steps`` closure steps."""
    opt = opcomp.build(expression, model, lr=lr)
    losses = [float(opt.step(closure)) for _ in range(steps)]
    return losses[0], losses[-1]


def tokens(seed: int = 0, batch: int = 4, length: int = 16, vocabulary: int = 97):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocabulary, (batch, length), generator=generator)


def test_gpt2_conv1d_layers_run_kfac_and_the_tied_embedding_falls_back():
    torch.manual_seed(0)
    model = hf.gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("error", opcomp.OpcompWarning)  # the first branch covers most of GPT-2
        runs = opcomp.build("fog", model).assignments()
    assert runs["transformer.h.0.attn.c_attn.weight"] == "muon ← kfac"  # a Conv1D
    assert runs["transformer.h.1.mlp.c_proj.weight"] == "muon ← kfac"
    assert runs["transformer.h.0.attn.c_attn.bias"] == "0.1 × adamw"
    assert runs["transformer.wte.weight"] == "0.1 × adamw"  # tied to lm_head: no layer statistics, by rule
    assert runs["transformer.wpe.weight"] == "0.1 × adamw"  # an embedding: not a hidden layer
    ids = tokens()
    first, last = trains(model, "fog", lambda: model(ids, labels=ids).loss)
    assert last < first


def test_a_conv1d_gets_the_statistics_and_direction_of_the_equivalent_linear():
    """transformers' Conv1D computes x W + b: the same layer as nn.Linear with weight Wᵀ."""
    library = hf.transformers()
    torch.manual_seed(1)
    conv = library.pytorch_utils.Conv1D(6, 4)  # nf=6 outputs, nx=4 inputs: weight (4, 6)
    linear = nn.Linear(4, 6)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    x, y = torch.randn(5, 7, 4), torch.randint(0, 6, (5, 7))
    moved = []
    for layer in (conv, linear):
        opt = opcomp.build("kfac[damping=0.01](g)", layer, lr=1.0)
        before = [p.detach().clone() for p in layer.parameters()]
        F.cross_entropy(layer(x).reshape(-1, 6), y.reshape(-1)).backward()
        opt.step()
        moved.append([b - p.detach() for b, p in zip(before, layer.parameters())])
    torch.testing.assert_close(moved[0][0], moved[1][0].T)
    torch.testing.assert_close(moved[0][1], moved[1][1])


def test_vit_runs_kfac_on_its_patch_convolution_and_projections_and_adamw_on_tokens():
    torch.manual_seed(0)
    model = hf.vit()
    runs = opcomp.build("fog", model).assignments()
    assert runs["vit.embeddings.patch_embeddings.projection.weight"] == "muon ← kfac"  # Conv2d
    assert runs["vit.layers.0.attention.q_proj.weight"] == "muon ← kfac"
    assert runs["vit.embeddings.cls_token"] == "0.1 × adamw"  # a raw parameter: no layer
    assert runs["classifier.weight"] == "0.1 × adamw"  # the output head
    generator = torch.Generator().manual_seed(2)
    images, labels = torch.randn(8, 3, 16, 16, generator=generator), torch.randint(0, 5, (8,), generator=generator)
    first, last = trains(model, "fog", lambda: model(pixel_values=images, labels=labels).loss, lr=0.01)
    assert last < first


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        mixed, _ = self.attention(h, h, h)
        return self.head(mixed)


def test_multihead_attention_falls_back_and_the_build_says_so():
    torch.manual_seed(0)
    model = Attention()
    with pytest.warns(opcomp.OpcompWarning, match="inside a MultiheadAttention, which projects where no hook reaches"):
        opt = opcomp.build("fog", model)
    runs = opt.assignments()
    assert runs["attention.in_proj_weight"] == runs["attention.out_proj.weight"] == "0.1 × adamw"
    assert runs["embed.weight"] == "muon ← kfac" and runs["head.weight"] == "0.1 × adamw"
    x, y = torch.randn(6, 5, 8), torch.randint(0, 3, (6, 5))
    first, last = trains(model, "fog", lambda: F.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1)), lr=0.01)
    assert last < first


@pytest.mark.parametrize("expression", ["fog", "diagfog", "muon_adamw"])
def test_resnet_blocks_train_with_conv_layers_on_the_main_branch(expression):
    torch.manual_seed(0)
    model = ResNet(widths=(8, 16), blocks=(1, 1))  # torchvision's layout, narrow and short
    runs = opcomp.build(expression, model).assignments()
    main = "muon" if expression == "muon_adamw" else f"muon ← {'kfac' if expression == 'fog' else 'diag_kfac'}"
    assert runs["conv1.weight"] == runs["layer2.0.conv1.weight"] == runs["layer2.0.downsample.0.weight"] == main
    assert runs["layer2.0.bn1.weight"] == runs["fc.weight"] == "0.1 × adamw"  # a norm and the output head
    generator = torch.Generator().manual_seed(3)
    images, labels = torch.randn(16, 3, 16, 16, generator=generator), torch.randint(0, 10, (16,), generator=generator)
    first, last = trains(model, expression, lambda: F.cross_entropy(model(images), labels), lr=0.01)
    assert last < first


def moved_by(expression: str, model: nn.Module, closure, **build) -> torch.Tensor:
    """u of one step at lr 1, flattened: (p before − p after)."""
    opt = opcomp.build(expression, model, lr=1.0, **build)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    opt.step(closure)
    return before - torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("expression", ["hvp(g)", "gnvp(g)", "lgn(g)"])
def test_gpt2_second_order_probes_read_logits_and_agree_under_gradient_checkpointing(expression):
    """GPT-2 returns a ModelOutput (the prediction is its logits) and keeps a cache; with gradient
    checkpointing the backward recomputes the forward, which must run the same attention kernel."""
    ids = tokens(length=8)
    moved = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = hf.gpt2()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        moved.append(moved_by(expression, model, lambda model=model: model(ids, labels=ids).loss))
    plain, checkpointed = moved
    assert plain.norm() > 0
    assert (checkpointed - plain).norm() / plain.norm() < 1e-5


def test_adagnoema_trains_gpt2():
    torch.manual_seed(0)
    model = hf.gpt2()
    ids = tokens()
    first, last = trains(model, "adagnoema", lambda: model(ids, labels=ids).loss)
    assert last < first


def test_monte_carlo_fisher_samples_from_a_model_outputs_logits():
    torch.manual_seed(0)
    model = hf.gpt2()
    ids = tokens()
    opt = opcomp.build("kfac[mc](g) | adamw(g)", model, lr=1e-3, likelihood="categorical", class_dim=-1)
    opt.step(lambda: model(ids, labels=ids).loss)
    state = opt.state[model.transformer.h[0].mlp.c_fc.weight]
    (factors,) = [value for key, value in state.items() if key.startswith("kfac[")]
    assert factors["G"].abs().sum() > 0


class TupleModel(nn.Module):
    """Returns (logits, features), as models written without dicts often do."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        features = torch.tanh(self.body(x))
        return self.head(features), features


def test_where_the_prediction_is_can_be_said_and_a_missing_one_is_named():
    torch.manual_seed(0)
    model = TupleModel()
    plain = nn.Sequential(copy.deepcopy(model.body), nn.Tanh(), copy.deepcopy(model.head))
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    opt = opcomp.build("gnvp(g)", model)
    with pytest.raises(opcomp.OpcompError, match=r"returned a tuple.*build with output='<key>' or output=lambda"):
        opt.step(lambda: F.cross_entropy(model(x)[0], y))
    moved = moved_by("gnvp(g)", model, lambda: F.cross_entropy(model(x)[0], y), output=lambda returned: returned[0])
    torch.testing.assert_close(moved, moved_by("gnvp(g)", plain, lambda: F.cross_entropy(plain(x), y)))
