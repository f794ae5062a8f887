"""The operator catalogue: importing this package registers every operator family."""

from opcomp.ops import combinators, probe, source, statistical, structural, temporal  # noqa: F401
from opcomp.ops.registry import (
    REGISTRY,
    Applies,
    Cost,
    Kind,
    LayerOptions,
    Needs,
    OpSpec,
    Options,
    SecondMoment,
    StateBuffer,
)

__all__ = [
    "REGISTRY",
    "Applies",
    "Cost",
    "Kind",
    "LayerOptions",
    "Needs",
    "OpSpec",
    "Options",
    "SecondMoment",
    "StateBuffer",
]
