"""The kernel tables: operator -> kernel, which kernels are collective, and the rebindings of ``g``.

Kernel families register here (``@kernel``, ``@rebinding``); :func:`opcomp.kernels.load` imports them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

KERNELS: dict[str, Callable] = {}
Collective = Literal["layers", "probe", "global"]
COLLECTIVE: dict[str, Collective] = {}
REBINDINGS: dict[str, Callable] = {}


def kernel(name: str, collective: Collective | None = None):
    """Register the kernel of operator ``name``."""

    def register(fn: Callable) -> Callable:
        if name in KERNELS:
            raise ValueError(f"kernel {name!r} registered twice")
        KERNELS[name] = fn
        if collective is not None:
            COLLECTIVE[name] = collective
        return fn

    return register


def rebinding(name: str):
    """Register what ``g`` means inside operator ``name``'s argument."""

    def register(fn: Callable) -> Callable:
        if name in REBINDINGS:
            raise ValueError(f"rebinding {name!r} registered twice")
        REBINDINGS[name] = fn
        return fn

    return register
