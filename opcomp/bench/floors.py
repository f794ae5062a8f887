"""What a KFAC-family step cannot do without: its matrix products alone, in fp32, on random
tensors of the shapes one recorded forward and backward gives each layer (Linear and Conv2d).

A preset's step divided by (its base step + these products) is its distance to its floor: what
forming rows, copies, element-wise work and Python add (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from opcomp.layers.summed import identity


@dataclass
class LayerShape:
    """One layer's sizes in a step: N examples, S positions each, in (A's width), out."""

    conv: bool
    examples: int
    positions: int
    inputs: int
    outputs: int
    state: dict  # the layer's node state: its factors and their inverses or eigenbases
    input_id: tuple  # equal for layers that read one input alike (one gram of A for them)

    def randn(self, *size: int) -> Tensor:
        """Random values on the factors' device, in their dtype."""
        return torch.randn(*size).to(self.state["A"])


def layer_shapes(model: nn.Module, opt: torch.optim.Optimizer, loss, node: str) -> list[LayerShape]:
    """Each captured layer whose ``node`` (``"kfac["``, ``"ekfac["``) state is there, after one
    recorded forward and backward (cleared again)."""
    opt.zero_grad()
    loss(model).backward()
    shapes = []
    for module, entries in opt._capture.entries.items():
        entry = next((e for e in entries if e.finished), None)
        state = next((v for k, v in opt.state[module.weight].items() if k.startswith(node)), None)
        if entry is None or state is None or not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        conv = isinstance(module, nn.Conv2d)
        inputs, outputs = len(state["A"]), len(state["G"])
        if entry.summed is not None:  # a conv summed at capture
            examples, positions, key = entry.summed.examples, entry.summed.positions, (entry.summed.source, inputs)
        else:
            examples = entry.input.shape[0] if entry.input.ndim > 1 else 1
            positions = entry.grad[0, 0].numel() if conv else entry.grad.numel() // (examples * outputs)
            key = (identity(entry.input), inputs)
        shapes.append(LayerShape(conv, examples, positions, inputs, outputs, state, key))
    opt._capture.clear()
    opt.zero_grad()
    return shapes


def grams(shapes: list[LayerShape]) -> list[Tensor]:
    """Rows of each factor's gram: one A per input read alike, a G per layer; a row per example
    of a conv (KFAC-reduce), per position of a Linear."""
    rows, seen = [], set()
    for shape in shapes:
        count = shape.examples if shape.conv else shape.examples * shape.positions
        if shape.input_id not in seen:
            seen.add(shape.input_id)
            rows.append(shape.randn(count, shape.inputs))
        rows.append(shape.randn(count, shape.outputs))
    return rows


def fog_products(shapes: list[LayerShape], grams_every: int = 1) -> Callable[[], None]:
    """fog's products: the grams, on every ``grams_every``-th call (fog_amortized: 10, its
    statistics' schedule), and G⁻¹ X A⁻¹ with each layer's inverses on every call."""
    rows = grams(shapes)
    preconditions = [(s.state["G_inv"], s.randn(s.outputs, s.inputs), s.state["A_inv"]) for s in shapes]
    calls = [0]

    def products() -> None:
        if calls[0] % grams_every == 0:
            for r in rows:
                r.T @ r
        calls[0] += 1
        for g_inverse, x, a_inverse in preconditions:
            g_inverse @ x @ a_inverse

    return products


def correction(shape: LayerShape) -> list[tuple[Tensor, Tensor]]:
    """The pairs EKFAC's per-example correction multiplies, in the order its code takes
    (opcomp.layers.statistics): output gradients into Q_G's basis, then each example's gradient
    summed over positions and rotated by Q_A (a conv with fewer outputs than positions), or the
    rows rotated by Q_A and multiplied per example; (d²)ᵀ(a²) with one position."""
    n, s, i, o, r = shape.examples, shape.positions, shape.inputs, shape.outputs, shape.randn
    pairs = [(r(n * s, o), r(o, o))]
    if s == 1:
        return [*pairs, (r(n, i), r(i, i)), (r(o, n), r(n, i))]
    if shape.conv and o < s:
        return [*pairs, (r(n, o, s), r(n, s, i)), (r(n * o, i), r(i, i))]
    return [*pairs, (r(n * s, i), r(i, i)), (r(n, o, s), r(n, s, i))]


def ekfac_products(shapes: list[LayerShape], invert_every: int = 10) -> Callable[[], None]:
    """EKFAC's products: the grams, the correction, the four products of Q_G ((Q_Gᵀ X Q_A) ⊘ s)
    Q_Aᵀ, and on every ``invert_every``-th call the eigendecompositions of A and G."""
    rows = grams(shapes)
    pairs = [pair for shape in shapes for pair in correction(shape)]
    bases = [(s.state["Q_G"], s.randn(s.outputs, s.inputs), s.state["Q_A"]) for s in shapes]
    factors = [s.state[name] for s in shapes for name in ("A", "G")]
    calls = [0]

    def products() -> None:
        for r in rows:
            r.T @ r
        for left, right in pairs:
            left @ right
        for q_g, x, q_a in bases:
            q_g @ ((q_g.T @ x) @ q_a) @ q_a.T
        if calls[0] % invert_every == 0:
            for factor in factors:
                torch.linalg.eigh(factor)
        calls[0] += 1

    return products
