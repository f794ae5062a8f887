"""Which layer is the model's output head, the one ``muon[hidden]`` (and fog) leave to the fallback.

Before the model has run, the head is a guess: Hugging Face's ``get_output_embeddings()`` where a
model names it, else the last Linear, Conv1D or Conv2d in registration order, where models usually
put their classifier. The model's first forward settles it: the layer whose output is the
prediction (the model's output, or what ``output=`` picks from it), else the last of those layers
to run. :class:`HeadWatch` sees that forward and tells the optimizer, which plans again when the
guess was wrong and nothing has stepped yet (and says so when something has). Compiled graphs
skip the watch: a model compiled from its first forward keeps the guess until an eager forward.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, nn

from opcomp.capture import remove_hooks, weakly
from opcomp.layers.kinds import kind_of
from opcomp.prediction import Prediction


def candidates(model: nn.Module, unhookable: set[int]) -> list[nn.Module]:
    """The layers that may be the head, in registration order."""
    return [m for m in model.modules() if (kind := kind_of(m)) is not None and kind.head and id(m) not in unhookable]


def guess(model: nn.Module | None, unhookable: set[int]) -> nn.Module | None:
    """The head before any forward: the one a Hugging Face model names, else the last candidate."""
    if model is None:
        return None
    layers = candidates(model, unhookable)
    named = getattr(model, "get_output_embeddings", None)
    try:
        output = named() if callable(named) else None
    except Exception:  # a model whose method is not implemented: fall back to the order
        output = None
    if any(output is layer for layer in layers):
        return output
    return layers[-1] if layers else None


@dataclass(eq=False)
class HeadWatch:
    """Hooks for one forward of ``model``: which candidate layer produced the prediction. On the
    forward's end (before any other hook of the model's, so a capture can still take a layer's
    record) ``decided(head, records)`` gets the head and each candidate's (input, output) of that
    forward; the hooks are gone afterwards."""

    model: nn.Module
    layers: list[nn.Module]
    prediction: Prediction
    decided: Callable[[nn.Module | None, dict], None]
    finished: list[nn.Module] = field(default_factory=list)
    records: dict[nn.Module, tuple[Tensor, Tensor]] = field(default_factory=dict)
    compiled: bool = False  # this forward runs through torch.compile: its layers' hooks may not all run
    handles: list = field(default_factory=list)

    def __post_init__(self) -> None:
        this = weakref.ref(self)
        for layer in self.layers:
            self.handles.append(layer.register_forward_hook(weakly(this, HeadWatch._layer_ran, compiled=False)))
        self.handles.append(self.model.register_forward_pre_hook(weakly(this, HeadWatch._starts, compiled=False)))
        self.handles.append(
            self.model.register_forward_hook(weakly(this, HeadWatch._ends, compiled=False), prepend=True)
        )
        weakref.finalize(self, remove_hooks, list(self.handles))

    def _starts(self, model: nn.Module, args: tuple) -> None:
        if model is self.model:  # not a deep copy of it, whose modules carry these hooks too
            self.finished, self.records = [], {}
            self.compiled = compiled_call(model)

    def _layer_ran(self, layer: nn.Module, args: tuple, output) -> None:
        if self.compiled or not any(layer is known for known in self.layers):
            return
        self.finished.append(layer)
        if args and isinstance(args[0], Tensor) and isinstance(output, Tensor):
            self.records[layer] = (args[0], output)

    def _ends(self, model: nn.Module, args: tuple, output) -> None:
        if model is not self.model or self.compiled or not self.finished:
            return  # a forward that ran none of the layers (a probe of something else): wait for one
        self.close()
        try:
            predicted = self.prediction(output)
        except Exception:  # where the prediction is, is reported where it is needed
            predicted = None
        producing = [m for m, (_, out) in self.records.items() if out is predicted]
        self.decided(producing[-1] if producing else self.finished[-1], self.records)

    def close(self) -> None:
        remove_hooks(self.handles)
        self.handles = []


def compiled_call(model: nn.Module) -> bool:
    """Whether this forward of ``model`` runs through torch.compile, whose graph skips the watch's
    layer hooks (and, broken in places, may run some of them): ``torch.compile(model)``'s wrapper
    calling it, or a model compiled in place (``model.compile()``)."""
    frames = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing is compiled
    inside = getattr(frames, "_is_in_optimized_module", None)
    return bool(inside is not None and inside()) or getattr(model, "_compiled_call_impl", None) is not None
