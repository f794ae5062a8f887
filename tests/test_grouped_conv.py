"""Grouped and depthwise Conv2d under the KFAC family: each group is an independent KFAC block
(its own A and G). A conv with groups = k computes k convolutions side by side, each from its
k-th of the input channels to its k-th of the outputs; the test builds exactly that — k separate
Conv2d layers on channel slices — and holds every layer operator on the grouped conv to the same
operator on the separate convs, in float64."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import opcomp


class Grouped(nn.Module):
    def __init__(self, inputs: int, outputs: int, groups: int, bias: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(inputs, outputs, 3, stride=2, padding=1, groups=groups, bias=bias)
        self.head = nn.Linear(outputs, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


class Separate(nn.Module):
    """The grouped model written out: one ordinary Conv2d per group, on its slice of the channels."""

    def __init__(self, grouped: Grouped) -> None:
        super().__init__()
        conv = grouped.conv
        self.groups, out = conv.groups, conv.out_channels // conv.groups
        self.convs = nn.ModuleList(
            nn.Conv2d(
                conv.in_channels // conv.groups,
                out,
                3,
                stride=2,
                padding=1,
                bias=conv.bias is not None,
                dtype=conv.weight.dtype,
            )
            for _ in range(conv.groups)
        )
        with torch.no_grad():
            for j, part in enumerate(self.convs):
                part.weight.copy_(conv.weight[j * out : (j + 1) * out])
                if part.bias is not None:
                    part.bias.copy_(conv.bias[j * out : (j + 1) * out])
        self.head = copy.deepcopy(grouped.head)

    def forward(self, x):
        parts = [conv(part) for conv, part in zip(self.convs, x.chunk(self.groups, 1))]
        return self.head(torch.relu(torch.cat(parts, 1)).mean((2, 3)))

    def as_grouped(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = torch.cat([conv.weight for conv in self.convs])
        bias = None if self.convs[0].bias is None else torch.cat([conv.bias for conv in self.convs])
        return weight, bias


EXPRESSIONS = [
    "kfac(g)",
    "kfac[damping_mode=exact](g)",
    "kfac[max_dim=2](g)",  # each group's A over budget: blocks of 2, the last one padded
    "kfac[block=1](g)",  # each group's factors kept diagonal
    "diag_kfac(g)",
    "ekfac(g)",
    "ekfac[max_dim=2](g)",  # EKFAC with A in blocks: the unfolded patches rotated block by block
    "ekfac[block=1](g)",  # EKFAC with A kept diagonal: the unfolded patches
]
SHAPES = {"grouped": (6, 9, 3), "depthwise": (4, 8, 4)}  # (in, out, groups); depthwise: multiplier 2


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_each_group_is_an_independent_kfac_block(expression, shape, bias):
    torch.manual_seed(0)
    grouped = Grouped(*SHAPES[shape], bias).double()
    separate = Separate(grouped)
    generator = torch.Generator().manual_seed(1)
    # more examples than A has rows: a full-rank A has one eigenbasis, which EKFAC's refit depends on
    x = torch.randn(48, SHAPES[shape][0], 6, 6, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 4, (48,), generator=generator)
    optimizers = [
        (grouped, opcomp.build(expression, grouped, lr=0.1)),
        (separate, opcomp.build(expression, separate, lr=0.1)),
    ]
    assert optimizers[0][1].assignments()["conv.weight"] == expression.split("[")[0].split("(")[0]
    for _ in range(3):
        for model, opt in optimizers:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    weight, bias_value = separate.as_grouped()
    torch.testing.assert_close(grouped.conv.weight, weight, rtol=1e-10, atol=1e-12)
    if bias:
        torch.testing.assert_close(grouped.conv.bias, bias_value, rtol=1e-10, atol=1e-12)


def test_a_grouped_conv_keeps_one_factor_per_group():
    torch.manual_seed(0)
    model = Grouped(6, 9, 3, bias=True)
    opt = opcomp.build("kfac(g)", model)
    F.cross_entropy(model(torch.randn(4, 6, 6, 6)), torch.randint(0, 4, (4,))).backward()
    opt.step()
    (state,) = [s for s in opt.state[model.conv.weight].values()]
    assert state["A"].shape == (3, 2 * 9 + 1, 2 * 9 + 1) and state["G"].shape == (3, 3, 3)
    assert state["A_inv"].shape == (3, 19, 19) and state["G_inv"].shape == (3, 3, 3)


class MobileBlock(nn.Module):
    """MobileNet's inverted residual: pointwise expansion, depthwise 3×3, pointwise projection."""

    def __init__(self, channels: int = 8, expansion: int = 4, classes: int = 5) -> None:
        super().__init__()
        wide = channels * expansion
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.expand = nn.Sequential(nn.Conv2d(channels, wide, 1, bias=False), nn.BatchNorm2d(wide), nn.ReLU6())
        self.depthwise = nn.Sequential(
            nn.Conv2d(wide, wide, 3, padding=1, groups=wide, bias=False), nn.BatchNorm2d(wide), nn.ReLU6()
        )
        self.project = nn.Sequential(nn.Conv2d(wide, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        h = self.stem(x)
        h = h + self.project(self.depthwise(self.expand(h)))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("preset", ["fog", "diagfog", "ekfac_sgd"])
def test_a_mobilenet_block_builds_and_trains_with_its_depthwise_conv_on_the_main_branch(preset):
    torch.manual_seed(0)
    model = MobileBlock()
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(32, 3, 8, 8, generator=generator), torch.randint(0, 5, (32,), generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", opcomp.OpcompWarning)
        opt = opcomp.build(preset, model, lr=0.01 if preset == "ekfac_sgd" else None)
    statistic = {"fog": "kfac", "diagfog": "diag_kfac", "ekfac_sgd": "ekfac"}[preset]
    assert statistic in opt.assignments()["depthwise.0.weight"]
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert opt.skipped_steps == 0 and losses[-1] < 0.8 * losses[0]


def test_a_grouped_conv_state_resumes_bit_for_bit():
    torch.manual_seed(0)
    model, twin = MobileBlock(), None
    twin = copy.deepcopy(model)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))

    def steps(net, opt, count):
        for _ in range(count):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", opcomp.OpcompWarning)
        opt = opcomp.build("ekfac_sgd", model, lr=0.01)
        steps(model, opt, 3)
        reference = opcomp.build("ekfac_sgd", twin, lr=0.01)
        steps(twin, reference, 3)
        saved = copy.deepcopy(reference.state_dict())
        resumed_model = copy.deepcopy(twin)
        resumed = opcomp.build("ekfac_sgd", resumed_model, lr=0.01)
        resumed.load_state_dict(saved)
    steps(model, opt, 2)
    steps(resumed_model, resumed, 2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))
