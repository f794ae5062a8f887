"""Whether a step is finite: the one way every route of a step decides it.

A step is kept only when the gradients, what every kernel checked (batch statistics, probed
losses and products) and everything the step wrote are free of inf and NaN; otherwise nothing of
it is kept and the optimizer counts a skip. :func:`flag` is the check itself, a 0-d bool tensor
that nothing waits for, eagerly or inside a compiled step; :func:`non_finite` is the same check in
the form torch's fused AdamW kernel takes. A step that decides on the host collects its flags in
one :class:`Checks` and reads them once at its end; work that cannot take inf or NaN (an
eigendecomposition), or that ranks must decide alike, calls :func:`require` and decides at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from opcomp.distributed import is_shard


class NonFinite(Exception):
    """A check met inf or NaN: the step is abandoned and nothing it changed is kept."""


def flag(tensors: Sequence[Tensor]) -> Tensor:
    """Whether every element is finite, as a 0-d bool tensor that nothing waits for.

    Eagerly a tensor's minimum and maximum (one pass, no temporary) decide it: NaN propagates
    through both and an infinity is one of them. They are joined with ``cat``'s type promotion,
    never narrowed, since a float64 gradient of 1e300 is finite. (Joining the tensors themselves
    first, to reduce once, measured twice as slow.) Inside a compiled step ``isfinite().all()``
    decides, which inductor fuses into one single-accumulator reduction per tensor (no slower
    than ``aminmax`` there); eagerly it would materialise a boolean tensor and cost eight times
    as much. (``(t * 0).sum()``, cheaper in appearance, is folded to 0 by inductor and checks
    nothing.)
    """
    present = [t for t in tensors if t.numel()]
    if not present:
        return torch.ones((), dtype=torch.bool, device=tensors[0].device)
    device = present[0].device
    if torch.compiler.is_compiling():
        return torch.stack([t.isfinite().all().to(device) for t in present]).all()
    ends = [torch.stack(torch.aminmax(t)) for t in present]
    shards = [is_shard(end) for end in ends]
    if any(shards) and not all(shards):  # FSDP2 shards beside plain tensors (counters): make them whole
        ends = [end.full_tensor() if shard else end for end, shard in zip(ends, shards)]
    return torch.cat([end.to(device) for end in ends]).isfinite().all()


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element is finite, exactly: :func:`flag`, read once."""
    return not tensors or bool(flag(tensors))


def require(values: Sequence[Tensor]) -> list[Tensor]:
    """``values``, or NonFinite now when any holds inf or NaN (one read of the device)."""
    if not all_finite(values):
        raise NonFinite
    return list(values)


def non_finite(grads: list[Tensor]) -> Tensor:
    """1.0 when any of ``grads`` holds inf or NaN, else 0.0: the float flag torch's fused AdamW
    takes as its ``found_inf``.

    Over plain, contiguous fp32 tensors of one device it is torch's own check, the one
    ``GradScaler`` makes (``_amp_foreach_non_finite_check_and_unscale_`` at a scale of 1: it
    writes each value back as it was, which an expanded gradient could not take): exact, and
    faster on the CPU than the per-tensor ``aminmax`` of :func:`flag`, which serves every other
    case.
    """
    device = grads[0].device
    plain = (g.dtype == torch.float32 and g.device == device and type(g) is Tensor and g.is_contiguous() for g in grads)
    if all(plain):
        found = torch.zeros((), dtype=torch.float32, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones((), device=device))
        return found
    return (~flag(grads)).to(torch.float32)


class Checks:
    """The finiteness checks of one step that decides on the host.

    ``deferred``: each check is recorded as a device flag and all are decided together at the
    step's end (:meth:`decided`, one read); otherwise each is decided as it comes (a step with
    probes, whose evaluations must stop at the first inf). Kernels reach it through their
    context (``ctx.checks(values)``).
    """

    def __init__(self, deferred: bool) -> None:
        self.deferred = deferred
        self.flags: list[Tensor] = []

    def __call__(self, values: Sequence[Tensor]) -> list[Tensor]:
        """``values``, checked: recorded when deferred, else NonFinite now if any is not finite."""
        if not self.deferred:
            return require(values)
        if values:
            self.flags.append(flag(values))
        return list(values)

    def together(self, like: Tensor) -> Tensor:
        """The recorded checks as one flag on ``like``'s device, which nothing reads."""
        if not self.flags:
            return torch.ones((), dtype=torch.bool, device=like.device)
        return torch.stack([f.to(like.device) for f in self.flags]).all()

    def decided(self) -> bool:
        """The recorded checks, decided: one read of the device."""
        return not self.flags or bool(self.together(self.flags[0]))
