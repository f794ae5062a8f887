"""Node state: what every stateful node keeps, per parameter or per layer, in one place.

``opt.state[param]`` maps a node's state key (its canonical text) to its buffers,
``{state_key: {buffer: tensor}}``. Kernels reach their buffers only through :class:`NodeState`
(one node over a list of parameters) or, for a layer's statistics, its one entry: buffers are
created on first use in the parameter's working precision, and every node counts its steps in one
``step`` counter. Before a step that can give up (layer statistics, probes) the optimizer takes a
:func:`snapshot` and puts it back if the step does, or, deciding on the device, keeps each buffer
where the step's flag says (:func:`keep_where`). Loading a saved state is :mod:`opcomp.checkpoint`'s.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from opcomp.precision import working_dtype

STEP = "step"
"""The buffer in which a node counts its steps (others may count other things: estimates, floors)."""


def entry(state, param: Tensor, key: str) -> dict:
    """A node's entry in the optimizer state for one parameter, created empty on first use."""
    return state[param].setdefault(key, {})


def peek(states: dict, key: str) -> dict:
    """A node's entry in one parameter's state dict, without creating it (empty when absent)."""
    return states.get(key, {})


def counter(entry: dict, like: Tensor, name: str = STEP) -> Tensor:
    """The 0-d counter ``name`` of a state entry, created at 0 on ``like``'s device in its working
    precision (fp64 counters for fp64 parameters keep bias corrections exact in double)."""
    if name not in entry:
        entry[name] = torch.zeros((), dtype=working_dtype(like.dtype), device=like.device)
    return entry[name]


HOST_COUNTS = WeakIdKeyDictionary()
"""Counter tensor -> its value, kept on the host by :func:`advance` so that deciding what a step
does (statistics due, inverses due) never reads the device. A counter missing here (fresh from a
state_dict, or one only ``tick`` advances) is read once."""


class Decision:
    """A step's device flag (kept or skipped) on its way to the host: copied without waiting
    (into pinned memory on CUDA, with an event to wait on should it be read before it lands;
    elsewhere at once). It is read when a host count needs it, in the next step at the earliest."""

    def __init__(self, flag: Tensor) -> None:
        self.host = torch.empty((), dtype=torch.bool, pin_memory=flag.is_cuda)
        self.host.copy_(flag, non_blocking=flag.is_cuda)
        self.event = None
        if flag.is_cuda:
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(flag.device))

    def kept(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        return bool(self.host.numpy())


class Undecided:
    """A counter's host value while its step's :class:`Decision` is on its way: ``after`` if the
    step was kept, else ``before`` (None: not known on the host, read from the device once)."""

    def __init__(self, before: int | None, after: int, decision: Decision) -> None:
        self.before, self.after, self.decision = before, after, decision

    def value(self) -> int | None:
        return self.after if self.decision.kept() else self.before


def host_count(count: Tensor) -> int | None:
    """The counter's value as the host knows it (None: not known), a decided :class:`Undecided`
    remembered as its value."""
    known = HOST_COUNTS.get(count)
    if isinstance(known, Undecided):
        known = known.value()
        if known is None:
            del HOST_COUNTS[count]
        else:
            HOST_COUNTS[count] = known
    return known


def advance(entry: dict, like: Tensor, name: str = STEP) -> int:
    """How often the counter was advanced before (known on the host after its first read); advances it."""
    before = 0 if name not in entry else host_count(entry[name])
    count = counter(entry, like, name)
    if before is None:
        before = HOST_COUNTS[count] = int(count.item())  # known from now on, as a kept step's "before"
    entry[name] = count + 1  # a new tensor: a snapshot that shares the old one keeps its value
    HOST_COUNTS[entry[name]] = before + 1
    return before


def taken(entry: dict, name: str = STEP) -> int:
    """Steps counted so far (0 before the first)."""
    count = entry.get(name)
    if count is None:
        return 0
    known = host_count(count)
    return int(count.item()) if known is None else known


def possibly_taken(entry: dict, name: str = STEP) -> tuple[int, ...]:
    """:func:`taken`, or both values it may have while the last step's decision is on its way to
    the host, without waiting for it (what arming the capture for the coming step needs)."""
    known = HOST_COUNTS.get(entry[name]) if name in entry else None
    if isinstance(known, Undecided) and known.before is not None:
        return (known.before, known.after)
    return (taken(entry, name),)


class NodeState:
    """One node's state over a list of parameters (a bucket, a probe's parameters): entries are
    created in each parameter's state dict on first use, so a node that keeps nothing adds nothing."""

    def __init__(self, states: list[dict], params: list[Tensor], key: str) -> None:
        self.states, self.params, self.key = states, params, key
        self._entries: list[dict] | None = None

    @property
    def entries(self) -> list[dict]:
        if self._entries is None:
            self._entries = [s.setdefault(self.key, {}) for s in self.states]
        return self._entries

    def buffers(self, name: str) -> list[Tensor]:
        """Buffer ``name`` per parameter, shaped like it, in its working precision, zero on first use."""
        return [self.buffer(index, name) for index in range(len(self.params))]

    def buffer(self, index: int, name: str) -> Tensor:
        """Buffer ``name`` of parameter ``index`` (:meth:`buffers`)."""
        entry, param = self.entries[index], self.params[index]
        if name not in entry:
            dtype = working_dtype(param.dtype)
            entry[name] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        return entry[name]

    def shaped(self, index: int, name: str, shape: tuple[int, ...]) -> Tensor:
        """Buffer ``name`` of parameter ``index`` with a shape of its own (a factor of the parameter's
        matrix view), in its working precision, zero on first use."""
        entry, param = self.entries[index], self.params[index]
        if name not in entry:
            entry[name] = torch.zeros(shape, dtype=working_dtype(param.dtype), device=param.device)
        return entry[name]

    def started(self, name: str, first: list[Tensor]) -> tuple[list[Tensor], list[bool]]:
        """Buffer ``name`` per parameter, started as a copy of ``first`` where it is new; with
        which ones were new (their value is ``first``'s, not yet updated)."""
        fresh = [name not in entry for entry in self.entries]
        for entry, value, new in zip(self.entries, first, fresh):
            if new:
                entry[name] = value.detach().clone()
        return [entry[name] for entry in self.entries], fresh

    def counters(self, name: str = STEP) -> list[Tensor]:
        """Each parameter's counter ``name`` as a 0-d tensor on its device (created at 0)."""
        return [counter(entry, param, name) for entry, param in zip(self.entries, self.params)]

    def tick(self) -> list[Tensor]:
        """Advance each parameter's step counter on the device; returns them as 0-d tensors, so a
        compiled step neither synchronises nor recompiles as they grow. (:meth:`advance` counts
        on the host instead; a node uses one or the other.)"""
        steps = self.counters()
        torch._foreach_add_(steps, 1.0)
        return steps

    def advance(self, name: str = STEP) -> int:
        """Steps taken before this one, on the host (all parameters step together); then advance."""
        return max(advance(entry, param, name) for entry, param in zip(self.entries, self.params))

    def advance_one(self, index: int, name: str = STEP) -> int:
        """:meth:`advance` for parameter ``index`` alone (a node that counts per parameter)."""
        return advance(self.entries[index], self.params[index], name)


def snapshot(state, params: list[Tensor], shared: Collection[str] = (), kept: Collection[Tensor] = ()) -> defaultdict:
    """A copy of the optimizer state to go back to: the buffers of ``params`` cloned, except those
    under the keys in ``shared``, whose nodes replace their tensors instead of writing into them
    (``OpSpec.replaces_state``), and those of ``kept`` parameters, whose values an :class:`Undo`
    keeps; their entries are copied (a step that creates state leaves none behind), their
    tensors shared, as is every other parameter's state."""
    touched, values_kept = {id(p) for p in params}, {id(p) for p in kept}
    copy: defaultdict = defaultdict(dict)
    for param, entries in state.items():
        if id(param) in touched:
            copy[param] = {
                key: dict(buffers) if key in shared else {n: _cloned(t) for n, t in buffers.items()}
                for key, buffers in entries.items()
            }
        elif id(param) in values_kept:
            copy[param] = {key: dict(buffers) for key, buffers in entries.items()}
        else:
            copy[param] = entries
    return copy


class Undo:
    """Copies of tensors a step writes in place, to put back if it must: one buffer per tensor,
    made on first use and written again each step, so keeping costs one copy and no allocation
    (an element-wise family's eager step; ``python -m opcomp.bench.update_check``)."""

    def __init__(self) -> None:
        self.copies = WeakIdKeyDictionary()

    def keep(self, tensors: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        kept = []
        for tensor in tensors:
            copy = self.copies.get(tensor)
            if copy is None or copy.shape != tensor.shape or copy.dtype != tensor.dtype:
                copy = self.copies[tensor] = torch.empty_like(tensor)
            kept.append((tensor, copy))
        for tensor, copy in kept:  # one copy_ each: DTensor shards (FSDP2) have no foreach copy
            copy.copy_(tensor)
        return kept

    @staticmethod
    def restore(kept: list[tuple[Tensor, Tensor]]) -> None:
        for tensor, copy in kept:
            tensor.copy_(copy)


def unchanged_layout(state, saved, params: list[Tensor]) -> bool:
    """Whether the step kept every state dict of ``params`` to the keys and buffer names it had
    when ``saved`` was taken: then :func:`keep_where` can undo it without the host knowing."""
    return all(
        state[p].keys() == saved[p].keys() and all(b.keys() == saved[p][k].keys() for k, b in state[p].items())
        for p in params
    )


def keep_where(ok: Tensor, state, saved, params: list[Tensor], shared: Collection[str]) -> None:
    """The step's state of ``params`` where ``ok`` (a device flag), ``saved``'s elsewhere, without
    reading ``ok``: buffers written in place take ``where(ok, new, old)`` in place, buffers a node
    replaced (under ``shared`` keys) and counters :func:`advance` replaced are replaced by it, a
    counter's host value waiting, :class:`Undecided`, until the host has ``ok``."""
    decision = None
    for param in params:
        for key, buffers in state[param].items():
            before = saved[param][key]
            for name, tensor in buffers.items():
                old = before[name]
                if tensor is old:
                    continue
                if key not in shared and tensor not in HOST_COUNTS:
                    tensor.copy_(torch.where(ok, tensor, old))
                    continue
                buffers[name] = torch.where(ok, tensor, old)
                after = HOST_COUNTS.get(tensor)
                if after is not None:
                    decision = decision or Decision(ok)
                    HOST_COUNTS[buffers[name]] = Undecided(host_count(old), after, decision)


def _cloned(tensor: Tensor) -> Tensor:
    """A clone that keeps the host's knowledge of a counter's value."""
    clone = tensor.clone()
    known = HOST_COUNTS.get(tensor)
    if known is not None:
        HOST_COUNTS[clone] = known
    return clone
