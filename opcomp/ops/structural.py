"""Structural operators: the geometry of the update."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from opcomp.ops.fields import Beta, Count, Positive
from opcomp.ops.registry import Applies, Kind, OpSpec, Options, StateBuffer, register
from opcomp.ops.statistical import ADAM_SECOND_MOMENT, MOMENTS, AdamOptions


class MatrixOptions(Options):
    hidden: bool = Field(
        False, description="only hidden layers' weights: not embeddings, output heads, tied or raw parameters"
    )


def _matrices(options: MatrixOptions) -> Applies:
    return Applies.HIDDEN if options.hidden else Applies.MATRIX


Coefficients = Literal["jordan", "polar_express"]
"""Newton–Schulz coefficient schedules (opcomp.kernels.matrix.schedule)."""


class NewtonSchulzOptions(Options):
    steps: Count = Field(5, description="Newton–Schulz iterations")
    coefficients: Coefficients = Field(
        "jordan",
        description="each step's quintic: Jordan's fixed (3.4445, −4.7750, 2.0315), as torch.optim.Muon; or "
        "Polar Express's per-step optimal ones (arXiv:2505.16932), closer to the polar factor in as many steps",
    )
    gram: bool = Field(
        False,
        description="Gram Newton–Schulz: the same steps kept on the rows × rows matrix XXᵀ, restarted every 2 steps, "
        "for matrices of 16 rows or more at least twice as wide as tall (others iterate as usual); fewer flops "
        "there. "
        "With Jordan's coefficients only",
    )

    @model_validator(mode="after")
    def _gram_keeps_to_jordans_quintic(self):
        if self.gram and self.coefficients != "jordan":
            raise ValueError(
                "gram needs coefficients=jordan: in bfloat16 the Gram form of Polar Express's steep first steps "
                "drifts and can blow up (singular values of 10⁵ and more measured); use one or the other"
            )
        return self


class OrthOptions(MatrixOptions, NewtonSchulzOptions):
    pass


register(
    OpSpec(
        name="orth",
        lr=0.03,  # muon's
        kind=Kind.STRUCTURAL,
        options=OrthOptions,
        applies=Applies.MATRIX,
        applies_when=_matrices,
        summary="approximate polar factor by quintic Newton–Schulz",
        formula=(
            "X = x viewed as (rows, −1) / (s‖x‖_F + 1e-7), transposed if tall; repeat steps: "
            "A = XXᵀ; B = bA + cA²; X = aX + BX; jordan: (a, b, c) = (3.4445, −4.7750, 2.0315), s = 1; "
            "polar_express: step i's minimax (a, b, c) of arXiv:2505.16932 (the 5th from then on), s = 1.02; "
            "gram (rows ≥ 16, cols ≥ 2·rows): R = XXᵀ, Q = I; each step Z = aI + bR + cR², Q = ZQ, R = ZRZ, "
            "every 2nd step first X = QX, R = XXᵀ, Q = I; finally X = QX"
        ),
    )
)


class MuonOptions(OrthOptions):
    beta: Beta = Field(0.95, description="momentum")
    nesterov: bool = Field(True, description="Nesterov look-ahead")


register(
    OpSpec(
        name="muon",
        lr=0.03,  # the muon_adamw preset
        kind=Kind.STRUCTURAL,
        options=MuonOptions,
        applies=Applies.MATRIX,
        applies_when=_matrices,
        state=(StateBuffer("momentum_buffer", "param", "momentum"),),
        summary="momentum, orthogonalised (torch.optim.Muon semantics)",
        formula="m.lerp_(x, 1−beta); u = x.lerp(m, beta) if nesterov else m; returns orth(u)·√max(1, rows/cols)",
    )
)


class AdaRMSuonOptions(AdamOptions, MatrixOptions, NewtonSchulzOptions):
    pass


register(
    OpSpec(
        name="adarmsuon",
        kind=Kind.STRUCTURAL,
        options=AdaRMSuonOptions,
        applies=Applies.MATRIX,
        applies_when=_matrices,
        state=MOMENTS,
        second_moment=ADAM_SECOND_MOMENT,
        summary="Adam direction orthogonalised with its energy kept",
        formula="a = adam(x); returns orth(a)·‖a‖_F/‖orth(a)‖_F",
    )
)

register(
    OpSpec(
        name="sign",
        kind=Kind.STRUCTURAL,
        summary="element-wise sign",
        formula="sign(x) (0 stays 0)",
    )
)

register(
    OpSpec(
        name="normalize",
        kind=Kind.STRUCTURAL,
        summary="scale to unit Frobenius norm per parameter",
        formula="x/‖x‖_F, and 0 where x = 0",
    )
)


class ClipOptions(Options):
    max_norm: Positive = Field(1.0, description="largest allowed norm")


register(
    OpSpec(
        name="clip",
        scale_of=0,
        kind=Kind.STRUCTURAL,
        options=ClipOptions,
        summary="shrink to at most max_norm per parameter",
        formula="x·min(1, max_norm/‖x‖_F)",
    )
)

register(
    OpSpec(
        name="clip_global",
        on_shards="a norm over every parameter",
        scale_of=0,
        kind=Kind.STRUCTURAL,
        options=ClipOptions,
        summary="shrink to at most max_norm over every parameter running it (torch's clip_grad_norm_)",
        formula="x·min(1, max_norm/(‖x‖ + 1e-6)), ‖x‖ the 2-norm of all parameters' x together",
    )
)

register(
    OpSpec(
        name="reject",
        scale_of=0,
        kind=Kind.STRUCTURAL,
        params=("x", "y"),
        summary="the part of x orthogonal to y",
        formula="x − (⟨x, y⟩/‖y‖²)·y per parameter (x when y = 0)",
    )
)

register(
    OpSpec(
        name="project",
        scale_of=0,
        kind=Kind.STRUCTURAL,
        params=("x", "y"),
        summary="the part of x along y",
        formula="(⟨x, y⟩/‖y‖²)·y per parameter (0 when y = 0)",
    )
)

register(
    OpSpec(
        name="graft",
        scale_of=1,
        kind=Kind.STRUCTURAL,
        params=("x", "y"),
        summary="x's direction with y's norm (grafting: Shampoo's direction at Adam's step size)",
        formula="(‖y‖/‖x‖)·x per parameter, Frobenius norms (0 when x = 0)",
    )
)
