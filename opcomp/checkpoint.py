"""Loading a saved optimizer state: everything is checked first, then applied.

A state_dict can arrive truncated, edited, from another model or another opcomp, or corrupted.
:func:`read` checks the whole of it against the optimizer — its structure, every group setting
the build would refuse, and every buffer: a node of this plan, the shape the node keeps here, a
dtype that casts to the parameter's working precision (complex, bool and integer moments do not;
sparse and meta tensors are refused), finite values, non-negative second moments, counters that
count — and only then returns what to apply; a refusal is an :class:`OpcompError` naming the
place, and leaves the optimizer as it was, so that it steps as if the load was never tried.
Floating state is cast to the parameter's working precision and device, as torch.optim casts it.

Saved keys are canonical text and are matched by node key; a key written by an earlier opcomp is
read again into today's spelling (:func:`opcomp.graph.current_state_key`), but only a key short
enough to be one of this plan's (an older spelling has fewer options, not more text), so reading
a checkpoint stays linear in its size.
"""

from __future__ import annotations

import math
import sys
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from opcomp.distributed import is_shard
from opcomp.errors import OpcompError, OpcompTypeError, OpcompValueError, OpcompWarning, warn
from opcomp.graph import Node, current_state_key
from opcomp.layers.record import Layer
from opcomp.layers.shapes import FactorForm
from opcomp.ops import Applies, StateBuffer
from opcomp.ops.registry import matrix_sides
from opcomp.plan import Plan
from opcomp.precision import working_dtype

RATES = ("lr", "initial_lr")
"""Group settings that are learning rates (``initial_lr``: an LR scheduler's), checked as the build checks one."""

SHOWN = 80
"""Characters of a saved key a message shows."""


def check_lr(lr, where: str) -> None:
    """A learning rate: a finite number >= 0 (or a one-element tensor of one)."""
    value = lr.item() if isinstance(lr, Tensor) and lr.numel() == 1 and not lr.is_meta else lr
    problem = f"the learning rate of {where} must be a finite number >= 0, got {_short(repr(lr))}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OpcompTypeError(problem)
    finite = math.isfinite(value) if isinstance(value, float) else abs(value) <= sys.float_info.max  # 10**400
    if not finite or value < 0:
        raise OpcompValueError(problem)


def read(plan: Plan, param_groups: list[dict], state_dict) -> tuple[list[dict], defaultdict, Counter]:
    """(each group's settings to restore, the state to load, the saved keys dropped) from a
    state_dict saved by an opcomp optimizer over the same parameters, groups in order; an
    OpcompError, before anything is changed, for anything that does not fit."""
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        got = (
            type(state_dict).__name__ if not isinstance(state_dict, Mapping) else f"keys {sorted(map(str, state_dict))}"
        )
        raise OpcompError(
            f"a state_dict is a dict with 'state' and 'param_groups', as opt.state_dict() returns; got {got}"
        )
    settings, by_index = _groups(state_dict["param_groups"], param_groups)
    saved_state = state_dict["state"]
    if not isinstance(saved_state, Mapping):
        raise OpcompError(f"the state_dict's 'state' is a {type(saved_state).__name__}, not a dict of parameters")
    state, dropped = _state(plan, saved_state, by_index)
    return settings, state, dropped


def _groups(saved_groups, param_groups: list[dict]) -> tuple[list[dict], dict]:
    if isinstance(saved_groups, (str, bytes)) or not isinstance(saved_groups, Sequence):
        raise OpcompError(f"the state_dict's 'param_groups' is a {type(saved_groups).__name__}, not a list")
    if len(saved_groups) != len(param_groups):
        raise OpcompError(f"the saved state has {len(saved_groups)} param groups, this optimizer {len(param_groups)}")
    by_index: dict = {}
    settings = []
    for number, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        where = f"the state_dict's param group {number}"
        if not isinstance(saved, Mapping) or "params" not in saved:
            raise OpcompError(f"{where} is not a dict with 'params': {_short(repr(saved))}")
        indices = saved["params"]
        if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence):
            raise OpcompError(f"{where}: 'params' is {_short(repr(indices))}, not a list of parameter indices")
        if len(indices) != len(group["params"]):
            raise OpcompError(
                f"param group {number}: the saved state has {len(indices)} parameters, this optimizer "
                f"{len(group['params'])}"
            )
        for index, param in zip(indices, group["params"]):
            if isinstance(index, bool) or not isinstance(index, int):
                raise OpcompError(f"{where}: parameter index {_short(repr(index))} is not an integer")
            if index in by_index:
                raise OpcompError(f"{where}: parameter index {index} appears twice in the saved groups")
            by_index[index] = param
        for rate in RATES:
            if rate in saved:
                check_lr(saved[rate], f"{where} ('{rate}')")
        settings.append({k: v for k, v in saved.items() if k not in ("params", "expr")})
    return settings, by_index


def _state(plan: Plan, saved_state: Mapping, by_index: dict) -> tuple[defaultdict, Counter]:
    """The state to load, checked whole; the keys of nodes this plan does not have (or whose layer
    moved) are dropped and counted."""
    layers = {(id(layer.owner), layer.node.state_key): layer for layer in plan.all_layers()}
    state: defaultdict = defaultdict(dict)
    dropped: Counter = Counter()
    for index, entries in saved_state.items():
        param = by_index.get(index) if isinstance(index, int) and not isinstance(index, bool) else None
        if param is None:
            raise OpcompError(
                f"the saved state names parameter {_short(repr(index))}, which no saved param group holds"
            )
        where = f"parameter '{plan.infos[id(param)].name}'"
        if not isinstance(entries, Mapping):
            raise OpcompError(f"the saved state of {where} is a {type(entries).__name__}, not a dict of nodes")
        if any(isinstance(v, Tensor) for v in entries.values()):
            raise OpcompError(
                "this state_dict was not saved by an opcomp optimizer (its state is not keyed by expression)"
            )
        nodes = {s.node.state_key: s.node for s in plan.program_of(param).steps}
        longest = max(map(len, nodes), default=0)
        for saved_key, buffers in entries.items():
            if not isinstance(saved_key, str):
                raise OpcompError(f"the saved state of {where} has a node key {_short(repr(saved_key))}, not text")
            if not isinstance(buffers, Mapping):
                raise OpcompError(
                    f"the saved state of {where} under '{_short(saved_key)}' is a {type(buffers).__name__}, "
                    "not a dict of buffers"
                )
            key = _current(saved_key, nodes, longest)
            node, layer = nodes.get(key), layers.get((id(param), key))
            if node is None or (node.applies is Applies.LAYER and layer is None):
                dropped[_short(saved_key)] += 1  # no such node here, or its layer moved
                continue
            state[param][key] = _buffers(where, node, param, layer, buffers)
    return state, dropped


def _current(saved_key: str, nodes: Mapping[str, Node], longest: int) -> str:
    """Today's spelling of a saved key: itself when this plan has it, else read again if it is
    short enough to be an older spelling of one of this plan's keys (else it matches nothing)."""
    if saved_key in nodes or len(saved_key) > 2 * longest + 64:
        return saved_key
    return current_state_key(saved_key)


def _buffers(where: str, node: Node, param: Tensor, layer: Layer | None, buffers: Mapping) -> dict:
    """Every saved buffer of ``node`` checked (declared, shape, dtype, values) and cast to the
    parameter's working precision and device."""
    declared = {b.name: b for b in node.spec.state}
    loaded = {}
    for name, tensor in buffers.items():
        if name not in declared:
            raise OpcompError(
                f"the saved state of {where} has a buffer {_short(repr(name))} for '{node.op}', which keeps "
                f"{', '.join(sorted(declared)) or 'no state'}: it was not saved by this version of opcomp"
            )
        buffer = declared[name]
        place = f"the saved state of {where}: '{node.op}' buffer '{name}'"
        if not isinstance(tensor, Tensor):
            raise OpcompError(f"{place} is not a tensor")
        if tensor.is_meta or tensor.layout != torch.strided:
            kind = "a meta tensor, which holds no values" if tensor.is_meta else f"a {tensor.layout} tensor"
            raise OpcompError(f"{place} is {kind}; opcomp keeps dense tensors")
        expected = expected_shape(buffer, param, layer, node)
        if tuple(tensor.shape) != expected:
            raise OpcompError(
                f"the saved state of {where} does not fit this model: '{node.op}' buffer '{name}' has shape "
                f"{tuple(tensor.shape)}, here it is {expected} — the state_dict belongs to parameters of "
                "other shapes (or another order of parameters)"
            )
        loaded[name] = _cast(place, buffer, tensor, param)
    return loaded


def _cast(place: str, buffer: StateBuffer, tensor: Tensor, param: Tensor) -> Tensor:
    counter = buffer.shape == "scalar"
    floating = torch.is_floating_point(tensor)
    integer = not floating and not tensor.is_complex() and tensor.dtype != torch.bool
    if not (floating or (counter and integer)):
        allowed = "a floating-point or integer count" if counter else "floating point"
        raise OpcompError(f"{place} has dtype {tensor.dtype}; it must be {allowed}")
    values = tensor.to_local() if is_shard(tensor) else tensor
    values = values.detach().double() if floating else values.detach()
    if floating and not bool(torch.isfinite(values).all()):
        raise OpcompError(f"{place} holds inf or NaN: the checkpoint is corrupt (a step would write NaN)")
    if counter and (bool(values < 0) or (floating and bool(values != values.round()))):
        raise OpcompError(f"{place} is {float(values):g}: a count of steps is a whole number >= 0")
    if buffer.nonnegative and bool((values < 0).any()):
        raise OpcompError(f"{place} has negative entries: it is a mean of squares, >= 0 (the checkpoint is corrupt)")
    return tensor.detach().clone().to(device=param.device, dtype=working_dtype(param.dtype))


def expected_shape(buffer: StateBuffer, param: Tensor, layer: Layer | None, node: Node) -> tuple[int, ...]:
    """The shape ``buffer`` has for ``param``; layer buffers take theirs from the layer's matrix X,
    a factor of a side over the node's ``factor_block`` is kept as diagonal blocks."""
    if buffer.shape == "param":
        return tuple(param.shape)
    if buffer.shape == "scalar":
        return ()
    if buffer.shape in ("rows", "cols", "left", "right"):
        rows, cols = matrix_sides(tuple(param.shape))
        side = rows if buffer.shape in ("rows", "left") else cols
        if buffer.shape in ("rows", "cols"):
            return (side,)
        block = node.spec.factor_block(node.options) if node.spec.factor_block else None
        return FactorForm.within(side, block).shape()
    return layer.buffer_shapes()[buffer.shape]


def warn_dropped(dropped: Counter) -> None:
    """Saved state this optimizer has no node for is left behind, and the user hears which."""
    if not dropped:
        return
    listed = "; ".join(f"'{key}' ({count} parameter{'s' * (count != 1)})" for key, count in dropped.most_common(5))
    more = f" and {len(dropped) - 5} more" if len(dropped) > 5 else ""
    warn(
        f"load_state_dict left behind saved state that no node of this optimizer keeps: {listed}{more}. "
        "Those operators start afresh; load into an optimizer built from the saved expression to keep it.",
        OpcompWarning,
    )


def _short(text: str) -> str:
    return text if len(text) <= SHOWN else text[: SHOWN - 1] + "…"
