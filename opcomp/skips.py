"""Steps skipped because a gradient, a probe or the step itself held inf or NaN.

A step that decides on the host (eager steps, layer statistics, probes) counts its skip there. A
compiled element-wise step decides inside its kernels and counts on the device, so it never waits
for the device; the host learns of those skips through a copy it does not wait for (pinned memory
on an accelerator, where it lags by a step or so), which is enough to warn. ``count`` reads the
device when asked: the user asked for a value.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

MESSAGE = (
    "opcomp: a gradient, a probe or the step itself held inf or NaN, so this step was skipped and "
    "nothing changed; opt.skipped_steps counts the skips (this warning is shown once)"
)


class Skips:
    """The optimizer's count of skipped steps, on the host and on the device."""

    def __init__(self) -> None:
        self.host = 0
        self.device: Tensor | None = None  # incremented by compiled steps, never read per step
        self.mirror: Tensor | None = None  # a host copy of ``device`` that nothing waits for
        self.warned = False

    def counter(self, like: Tensor) -> Tensor:
        """The device counter a compiled step adds its skip to, on ``like``'s device."""
        if self.device is None:
            self.device = torch.zeros((), dtype=torch.int32, device=like.device)
            self.mirror = torch.zeros((), dtype=torch.int32, pin_memory=like.is_cuda)
        return self.device

    def skipped(self, stacklevel: int) -> None:
        """A step decided on the host that it skips."""
        self.host += 1
        self.notice(stacklevel + 1)

    def after_device_step(self, stacklevel: int) -> None:
        """After a step that counted its skip on the device: start copying the count to the host,
        and warn if a copy already shows a skip."""
        self.mirror.copy_(self.device, non_blocking=True)
        self.notice(stacklevel + 1)

    def notice(self, stacklevel: int) -> None:
        seen = self.host + (int(self.mirror.numpy()) if self.mirror is not None else 0)
        if seen and not self.warned:
            self.warned = True
            warnings.warn(MESSAGE, RuntimeWarning, stacklevel=stacklevel + 1)

    @property
    def count(self) -> int:
        return self.host + (int(self.device.item()) if self.device is not None else 0)
