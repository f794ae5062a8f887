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

from opcomp.kernels.table import COLLECTIVE, KERNELS, REBINDINGS, Collective, kernel, rebinding

__all__ = ["COLLECTIVE", "KERNELS", "REBINDINGS", "Collective", "kernel", "load", "rebinding"]


def load() -> dict[str, Callable]:
    """Import every kernel family once, and return the table."""
    from opcomp.kernels import curvature, elementwise, estimators, factored, kfac, matrix, reductions, shifted  # noqa: F401

    return KERNELS
