"""``torch.autograd.grad`` as opcomp calls it, with the one failure users meet named in their terms.

opcomp differentiates the loss itself (the closure protocol, probes, Hessian and Gauss–Newton
products, Monte Carlo Fisher gradients) with ``torch.autograd.grad``, which reentrant activation
checkpointing (``torch.utils.checkpoint(..., use_reentrant=True)``) refuses from inside torch.
"""

from __future__ import annotations

import torch

from opcomp.errors import OpcompError


def differentiate(outputs, inputs, grad_outputs=None, *, needed_by: str, **options) -> tuple:
    """``torch.autograd.grad(outputs, inputs, grad_outputs, **options)``; reentrant checkpointing
    becomes an OpcompError that names ``needed_by`` (what differentiates) and the fix."""
    try:
        return torch.autograd.grad(outputs, inputs, grad_outputs, **options)
    except RuntimeError as error:
        if "use_reentrant" not in str(error):
            raise
        raise OpcompError(
            f"the model runs torch.utils.checkpoint with use_reentrant=True, which torch cannot differentiate "
            f"with torch.autograd.grad, as {needed_by} does: checkpoint with use_reentrant=False (torch's "
            "recommended setting; the result is the same)"
        ) from None


def products(outputs, inputs, grad_outputs, *, needed_by: str, **options) -> tuple:
    """Σ_i grad_outputs_i · ∂outputs_i/∂inputs, None where no output reaches an input. An output
    that does not require grad is constant in the inputs (a loss linear in a parameter has a
    constant gradient): its term is zero, where torch.autograd.grad would refuse it."""
    pairs = [(o, v) for o, v in zip(outputs, grad_outputs) if o.requires_grad]
    if not pairs:
        return (None,) * len(inputs)
    return differentiate(
        [o for o, _ in pairs], inputs, [v for _, v in pairs], needed_by=needed_by, allow_unused=True, **options
    )
