"""What a preset costs: passes per step and optimizer state per parameter, measured on a small CNN.

State depends on shapes (KFAC factors), not data, so random inputs of the digits CNN's shape do.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from opcomp.builder import build
from opcomp.comparison import models
from opcomp.comparison.report import table_cell
from opcomp.definitions import presets as preset_namespace
from opcomp.graph import lower
from opcomp.lang.printer import to_source
from opcomp.learning_rates import LARGE_CNN, TRANSFORMER
from opcomp.optimizer import Optimizer


def state_bytes(opt: Optimizer) -> int:
    """The bytes of every tensor in ``opt.state``, however nested (heavyball keeps SOAP's
    eigenbases in lists), each tensor counted once."""
    seen: set[int] = set()

    def size(value) -> int:
        if isinstance(value, Tensor):
            if id(value) in seen:
                return 0
            seen.add(id(value))
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(size(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(size(v) for v in value)
        return 0

    return sum(size(entries) for entries in opt.state.values())


def measure(expression: str, steps: int = 2) -> tuple[float, str]:
    """(state bytes per parameter, passes per step) of ``expression`` on the digits CNN."""
    torch.manual_seed(0)
    model = models.cnn()
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    opt = build(expression, model, likelihood="categorical")
    for _ in range(steps):
        opt.step(lambda: F.cross_entropy(model(x), y))
    parameters = sum(p.numel() for p in model.parameters())
    return state_bytes(opt) / parameters, passes_on(expression, model)


def passes_on(expression: str, model) -> str:
    """Forward and backward passes per step of ``expression`` on ``model`` (per-layer work counted)."""
    from opcomp.rules import is_rule_file

    if is_rule_file(expression):
        return "per rule (opcomp explain FILE --model ...)"
    fixed, per_layer, _ = lower(expression).cost()
    layers = sum(1 for m in model.modules() if any(True for _ in m.parameters(recurse=False)))
    forward, backward = fixed.forward + layers * per_layer.forward, fixed.backward + layers * per_layer.backward
    return f"{forward:g} forward, {backward:g} backward"


def preset_table() -> str:
    presets = preset_namespace()
    lines = [
        "| preset | lr | lr on transformers | lr on large CNNs | passes per step | state bytes / parameter "
        "| definition |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in presets.names():
        per_parameter, passes = measure(name)
        definition = table_cell(to_source(presets.get(name).body))
        note = presets.note(name)
        lines.append(
            f"| {name} | {note.lr:g} | {note.lr_for(TRANSFORMER):g} | {note.lr_for(LARGE_CNN):g} | {passes} "
            f"| {per_parameter:.1f} | `{definition}` |"
        )
    count = sum(p.numel() for p in models.cnn().parameters())
    lines.append("")
    lines.append(
        f"Passes and bytes measured on the small digits CNN (2 convolutions, 1 linear layer, {count:,} parameters)."
    )
    return "\n".join(lines)
