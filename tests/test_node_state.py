"""Every operator keeps exactly the state its spec declares: stepping each one (with the option
settings that switch buffers on) writes only declared buffers, and every declared buffer is written."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import opcomp
from opcomp.kernels import KERNELS, load
from opcomp.ops import Applies

load()

SETTINGS = {  # expressions beyond each operator's plain one, for buffers that options switch on
    "adafactor": ["adafactor[b1=0.9]"],  # the first moment is kept only with b1 > 0
    "kfac": ["kfac[damping_mode=exact](g) | g"],
    "sam": ["sam[fisher](momentum(g))"],  # an inner without a second moment: sam keeps its own
    "zo": ["zo[newton, eps=1e-6]"],  # curvature far below the rounding floor: the floor is counted
}


def plain(name: str) -> str:
    """The operator applied to g (as often as it takes arguments), with a fallback where it is restricted."""
    spec = opcomp.REGISTRY[name]
    text = name if not spec.params else f"{name}({', '.join(['g'] * spec.arity)})"
    return text if spec.applies is Applies.ANY else f"{text} | g"


def written(expression: str) -> dict[str, set[str]]:
    """Operator -> the buffer names its nodes hold after three steps on a small MLP."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt = opcomp.build(expression, model, lr=1e-3, likelihood="categorical")
    for _ in range(3):
        opt.step(lambda: F.cross_entropy(model(x), y))
    graph = opcomp.lower(expression)
    ops = {node.state_key: node.op for node in graph.nodes}
    found: dict[str, set[str]] = defaultdict(set)
    for entries in opt.state.values():
        for key, buffers in entries.items():
            found[ops[key]] |= set(buffers)
    return found


OPERATORS = sorted(name for name in KERNELS if opcomp.REGISTRY[name].callable)


@pytest.mark.parametrize("name", OPERATORS)
def test_each_operator_writes_exactly_the_state_its_spec_declares(name):
    declared = {buffer.name for buffer in opcomp.REGISTRY[name].state}
    seen: set[str] = set()
    for expression in [plain(name), *SETTINGS.get(name, [])]:
        buffers = written(expression).get(name, set())
        assert buffers <= declared, f"{expression} writes {sorted(buffers - declared)}, undeclared"
        seen |= buffers
    assert seen == declared, f"{name} declares {sorted(declared - seen)} and never writes them"


def test_every_kernel_belongs_to_a_registered_operator():
    assert set(KERNELS) <= set(opcomp.REGISTRY.specs)
    assert {s.name for s in opcomp.REGISTRY} - set(KERNELS) <= {"fallback"}  # resolved at build, never run
