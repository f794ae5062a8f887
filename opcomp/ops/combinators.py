"""The language's own operators: sums, scaling and fallback, written with symbols."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from opcomp.ops.registry import Kind, OpSpec, Options, register


class SumOptions(Options):
    ops: tuple[Literal["+", "-"], ...] = Field(description="the sign before each input after the first")


class ScaleOptions(Options):
    c: float = Field(description="the factor (finite)")


register(
    OpSpec(
        name="sum",
        kind=Kind.COMBINATOR,
        symbol="+",
        variadic=True,
        options=SumOptions,
        params=("a", "b"),
        summary="sum and difference of directions",
        formula="a + b − c …, evaluated left to right",
    )
)

register(
    OpSpec(
        name="scale",
        kind=Kind.COMBINATOR,
        symbol="*",
        options=ScaleOptions,
        summary="a direction times a number",
        formula="c·x",
    )
)

register(
    OpSpec(
        name="fallback",
        kind=Kind.COMBINATOR,
        symbol="|",
        variadic=True,
        params=("a", "b"),
        summary="per parameter, the first branch that applies",
        formula="a where every node of a applies to the parameter, else b, …",
    )
)
