"""Temporal operators: state carried from step to step."""

from __future__ import annotations

from pydantic import Field, model_validator

from opcomp.ops.fields import Beta, NonNegative
from opcomp.ops.registry import Kind, OpSpec, Options, StateBuffer, register


class EmaOptions(Options):
    beta: Beta = Field(0.9, description="decay")
    debias: bool = Field(False, description="divide by 1 - beta^t")


register(
    OpSpec(
        name="ema",
        scale_of=0,
        kind=Kind.TEMPORAL,
        options=EmaOptions,
        state=(StateBuffer("ema", "param", "running average"), StateBuffer("step", "scalar", "steps taken")),
        summary="exponential moving average",
        formula="m ← beta·m + (1−beta)·x; returns m (÷ (1−beta^t) if debias)",
    )
)


class MomentumOptions(Options):
    beta: Beta = Field(0.9, description="momentum factor")
    nesterov: bool = Field(False, description="Nesterov look-ahead")
    dampening: Beta = Field(0.0, description="damping of the new input")

    @model_validator(mode="after")
    def _nesterov_needs_plain_momentum(self):
        if self.nesterov and (self.beta == 0.0 or self.dampening != 0.0):
            raise ValueError("nesterov needs beta > 0 and dampening=0 (as torch.optim.SGD)")
        return self


register(
    OpSpec(
        name="momentum",
        lr=0.1,
        kind_lrs={"large_cnn": 0.03},  # 0.033 tuned on ResNet-18, better than 0.1 on two more ResNets (docs/presets.md)
        kind=Kind.TEMPORAL,
        options=MomentumOptions,
        state=(StateBuffer("momentum_buffer", "param", "velocity"),),
        summary="heavy-ball momentum with torch.optim.SGD semantics",
        formula="b ← x on the first step, else beta·b + (1−dampening)·x; returns x + beta·b if nesterov else b",
    )
)


class LionOptions(Options):
    b1: Beta = Field(0.9, description="interpolation of the update")
    b2: Beta = Field(0.99, description="momentum decay")
    wd: NonNegative = Field(0.0, description="decoupled weight decay")


register(
    OpSpec(
        name="lion",
        lr=0.003,  # 0.001 before: 184% worse than tuned on MNIST over three seeds (docs/presets.md)
        kind_lrs={"large_cnn": 0.0003},  # 0.00033 tuned on ResNet-18, better than 0.003 on two more (docs/presets.md)
        kind=Kind.TEMPORAL,
        options=LionOptions,
        state=(StateBuffer("exp_avg", "param", "momentum"),),
        summary="sign of an interpolated momentum (Lion, Chen et al. 2023)",
        formula="u = sign(b1·m + (1−b1)·x); m ← b2·m + (1−b2)·x; returns u + wd·p",
    )
)
