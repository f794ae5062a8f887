"""Sources: the values an expression starts from."""

from __future__ import annotations

from pydantic import Field

from opcomp.ops.fields import Positive
from opcomp.ops.registry import Cost, Kind, Needs, OpSpec, Options, register

register(
    OpSpec(
        name="g",
        lr=0.3,  # the sgd preset's rates
        kind_lrs={"large_cnn": 0.1},
        aliases=("grad",),
        kind=Kind.SOURCE,
        params=(),
        reads_gradient=True,
        summary="the gradient of the loss",
        formula="g = ∇L(p) (inside `sam`, the gradient at the perturbed point)",
    )
)

register(
    OpSpec(
        name="p",
        aliases=("param",),
        kind=Kind.SOURCE,
        params=(),
        summary="the parameter itself",
        formula="p",
    )
)


class GradAtOptions(Options):
    rho: Positive = Field(0.05, description="distance of the probed point")


register(
    OpSpec(
        name="grad_at",
        kind=Kind.SOURCE,
        params=("d",),
        options=GradAtOptions,
        needs=Needs(closure=True),
        cost=Cost(forward=1, backward=1, memory="a copy of the parameters while probing"),
        summary="the gradient at a point shifted along d",
        formula="∇L(p + rho·d/‖d‖), ‖·‖ the global norm over the parameters",
    )
)
