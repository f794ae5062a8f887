"""Kernels: how each operator computes over a bucket of parameters.

A kernel takes a :class:`Ctx` and one list of fp32 tensors per argument, and returns a list of
fp32 tensors (one per parameter in the bucket). Element-wise work runs as ``torch._foreach_*``
over the list; work that needs per-parameter reductions or matrix products runs on the bucket
stacked into one slab.

A *collective* kernel runs once over every parameter of an expression that runs its node, not per
bucket: layer kernels (a layer's weight and bias share statistics), probe kernels (a product
with the Hessian or a shifted evaluation couples all parameters) and global kernels (a norm over
every parameter, as ``clip_grad_norm_`` takes; they cannot fail, so they still step in place).

An operator whose spec ``binds_gradient`` (``sam``) also registers a *rebinding*: before any node
runs, it computes, from a :class:`ProbeCtx` over the parameters whose programs read ``g`` inside
it, the gradient that ``g`` means there.
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


def load() -> dict[str, Callable]:
    """Import every kernel family once, and return the table."""
    from opcomp.kernels import curvature, elementwise, estimators, layers, matrix, reductions, shifted  # noqa: F401

    return KERNELS
