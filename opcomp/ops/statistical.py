"""Statistical operators: preconditioners built from gradient and curvature statistics."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from opcomp.ops.fields import Beta, Count, NonNegative, Positive, Size
from opcomp.ops.registry import (
    Applies,
    Cost,
    Kind,
    LayerOptions,
    Needs,
    OpSpec,
    Options,
    SecondMoment,
    StateBuffer,
    register,
)

_STEP = StateBuffer("step", "scalar", "steps taken")
MOMENTS = (
    StateBuffer("exp_avg", "param", "first moment"),
    StateBuffer("exp_avg_sq", "param", "second moment", nonnegative=True),
    _STEP,
)
ADAM_SECOND_MOMENT = SecondMoment("exp_avg_sq", "b2", debiased=True)


class AdamOptions(Options):
    b1: Beta = Field(0.9, description="first-moment decay")
    b2: Beta = Field(0.999, description="second-moment decay")
    eps: Positive = Field(1e-8, description="added to √v̂")


class AdamWOptions(AdamOptions):
    wd: NonNegative = Field(0.01, description="decoupled weight decay")


register(
    OpSpec(
        name="adam",
        lr=0.03,  # adamw's: the same update scale
        kind_lrs={"transformer": 0.003, "large_cnn": 0.003},
        fused_adamw=frozenset({"b1", "b2", "eps"}),
        aliases=("adarms",),
        kind=Kind.STATISTICAL,
        options=AdamOptions,
        state=MOMENTS,
        second_moment=ADAM_SECOND_MOMENT,
        summary="Adam's bias-corrected moment ratio (torch.optim.Adam semantics)",
        formula="m ← b1·m + (1−b1)·x; v ← b2·v + (1−b2)·x²; returns m̂/(√v̂ + eps)",
    )
)

register(
    OpSpec(
        name="adamw",
        lr=0.03,
        # transformers: 0.0033 tuned on the Bible, 0.009 on help text; large CNNs: 0.0033 on four ResNets
        kind_lrs={"transformer": 0.003, "large_cnn": 0.003},  # (docs/presets.md)
        fused_adamw=frozenset({"b1", "b2", "eps", "wd"}),
        kind=Kind.STATISTICAL,
        options=AdamWOptions,
        state=MOMENTS,
        second_moment=ADAM_SECOND_MOMENT,
        summary="Adam plus decoupled weight decay (identical to torch.optim.AdamW)",
        formula="adam(x) + wd·p",
    )
)


class RmsOptions(Options):
    beta: Beta = Field(0.99, description="decay of the squared average")
    eps: Positive = Field(1e-8, description="added to √v")


register(
    OpSpec(
        name="rms",
        kind=Kind.STATISTICAL,
        options=RmsOptions,
        state=(StateBuffer("square_avg", "param", "running average of x²", nonnegative=True),),
        second_moment=SecondMoment("square_avg", "beta", debiased=False),
        summary="RMSprop scaling (torch.optim.RMSprop semantics)",
        formula="v ← beta·v + (1−beta)·x²; returns x/(√v + eps)",
    )
)


class DiagFisherOptions(Options):
    beta: Beta = Field(0.95, description="decay of the squared-gradient average")
    eps: Positive = Field(1e-8, description="added to the diagonal")


register(
    OpSpec(
        name="diag_fisher",
        kind=Kind.STATISTICAL,
        options=DiagFisherOptions,
        reads_gradient=True,
        state=(StateBuffer("fisher_diag", "param", "running average of g²", nonnegative=True),),
        summary="element-wise empirical Fisher diagonal (the DiagFOG seed formula)",
        formula="f ← beta·f + (1−beta)·g²; returns x/(f + eps)",
    )
)


class DiagKfacOptions(LayerOptions):
    decay: Beta = Field(0.95, description="decay of the factor averages")
    damping: Positive = Field(1e-3, description="added to each factor")


class FactorOptions(DiagKfacOptions):
    max_dim: Count = Field(
        4096,
        description="the size budget: a factor of a larger dimension d is kept as diagonal blocks of max_dim × "
        "max_dim (O(max_dim·d) memory), and the build says so",
    )
    block: Size = Field(
        0,
        description="Block-KFAC: every factor longer than this is kept as diagonal blocks of block × block, full "
        "statistics within a block and none between (O(block·d) memory; the last block is zero-padded); "
        "0: only factors over max_dim",
    )
    bf16: bool = Field(
        False,
        description="the per-step products (aᵀa, δᵀδ and the preconditioning) take bfloat16 inputs; factors, "
        "their averages and their decompositions stay in the working precision",
    )


class KfacOptions(FactorOptions):
    invert_every: Count = Field(10, description="steps between refreshing the inverses")
    damping_mode: Literal["factored", "exact"] = Field(
        "factored", description="π-split damping per factor, or (G⊗A + λI)⁻¹ through the eigenbases"
    )
    fisher: Literal["empirical", "mc"] = Field(
        "empirical", description="output gradients from the labels, or from labels sampled from the model"
    )


class EkfacOptions(FactorOptions):
    invert_every: Count = Field(10, description="steps between refreshing the eigenbases")
    fisher: Literal["empirical", "mc"] = Field("empirical", description="as in kfac")


def _mc_cost(options) -> Cost:
    return Cost(backward=1, memory="the sampled-label gradients at layer outputs") if options.fisher == "mc" else Cost()


def _mc_needs(options) -> Needs:
    return Needs(model=True, likelihood=options.fisher == "mc")


_FACTORS = (
    StateBuffer(
        "A",
        "in_factor",
        "E[a aᵀ] of layer inputs (bias as an appended 1; its diagonal for an Embedding; diagonal blocks "
        "(count, block, block) beyond block or max_dim)",
    ),
    StateBuffer(
        "G", "out_factor", "E[δ δᵀ] of output gradients, per example (diagonal blocks beyond block or max_dim)"
    ),
)
_EIGENBASES = (
    StateBuffer("Q_A", "in_factor", "eigenbasis of A (none when A is kept diagonal)"),
    StateBuffer("Q_G", "out_factor", "eigenbasis of G (none when G is kept diagonal)"),
    StateBuffer("A_eigenvalues", "in_diag", "eigenvalues of A"),
    StateBuffer("G_eigenvalues", "out_diag", "eigenvalues of G"),
)

register(
    OpSpec(
        name="kfac",
        kind=Kind.STATISTICAL,
        options=KfacOptions,
        applies=Applies.LAYER,
        replaces_state=True,
        needs=Needs(model=True),
        needs_when=_mc_needs,
        reads_gradient=True,
        cost_when=_mc_cost,
        state=(
            *_FACTORS,
            StateBuffer("A_inv", "in_factor", "(A + λ_A I)⁻¹, damping_mode=factored"),
            StateBuffer("G_inv", "out_factor", "(G + λ_G I)⁻¹, damping_mode=factored"),
            *(StateBuffer(b.name, b.shape, b.doc + ", damping_mode=exact") for b in _EIGENBASES),
            _STEP,
        ),
        summary="Kronecker-factored natural gradient per layer",
        formula="(G + λ_G I)⁻¹ X (A + λ_A I)⁻¹ with X = [∇W | ∇b]; exact mode: (G⊗A + λI)⁻¹ vec X",
    )
)

register(
    OpSpec(
        name="diag_kfac",
        kind=Kind.STATISTICAL,
        options=DiagKfacOptions,
        applies=Applies.LAYER,
        replaces_state=True,
        needs=Needs(model=True),
        reads_gradient=True,
        state=(
            StateBuffer("A_diag", "in_diag", "diagonal of A", nonnegative=True),
            StateBuffer("G_diag", "out_diag", "diagonal of G", nonnegative=True),
            _STEP,
        ),
        summary="KFAC with only the factors' diagonals (the DiagFOG code)",
        formula="X ⊙ 1/((diag G + λ)(diag A + λ)ᵀ)",
    )
)

register(
    OpSpec(
        name="ekfac",
        kind=Kind.STATISTICAL,
        options=EkfacOptions,
        applies=Applies.LAYER,
        replaces_state=True,
        needs=Needs(model=True),
        needs_when=_mc_needs,
        reads_gradient=True,
        per_example=True,
        cost_when=_mc_cost,
        state=(
            *_FACTORS,
            *_EIGENBASES,
            StateBuffer(
                "scale",
                "layer_matrix",
                "corrected eigenvalues E[(Q_Gᵀ ∇W_n Q_A)²] (bias column included)",
                nonnegative=True,
            ),
            _STEP,
        ),
        summary="KFAC eigenbases with eigenvalues re-fitted to per-example gradients",
        formula="Q_G ((Q_Gᵀ X Q_A) ⊘ (s + λ)) Q_Aᵀ, s = E[(Q_Gᵀ ∇W_n Q_A)²]",
    )
)


class DiagHessianOptions(Options):
    beta: Beta = Field(0.999, description="decay of the squared estimate")
    eps: Positive = Field(1e-4, description="added to the denominator")
    power: float = Field(1.0, gt=0.0, le=1.0, description="Hessian power k")
    update_every: Count = Field(1, description="steps between Hutchinson estimates")


register(
    OpSpec(
        name="diag_hessian",
        kind=Kind.STATISTICAL,
        options=DiagHessianOptions,
        needs=Needs(closure=True, double_backward=True),
        reads_gradient=True,
        cost=Cost(backward=1, memory="the first backward's graph (create_graph)"),
        state=(
            StateBuffer("hess_sq", "param", "running average of the squared estimate D²", nonnegative=True),
            StateBuffer("estimates", "scalar", "estimates taken"),
            _STEP,
        ),
        summary="Hutchinson Hessian-diagonal preconditioner (AdaHessian style)",
        formula="D = z ⊙ Hz, z Rademacher; v ← beta·v + (1−beta)·D²; returns x/((v/(1−beta^t))^(power/2) + eps)",
    )
)


class AdafactorOptions(Options):
    b1: Beta = Field(0.0, description="first-moment decay of the clipped update; 0 keeps none")
    decay: float = Field(-0.8, lt=0.0, description="c of the second-moment decay 1 − t^c at step t")
    eps1: Positive = Field(1e-30, description="added to g² before it is averaged")
    eps2: Positive = Field(1e-3, description="floor of the parameter's RMS when scale_parameter")
    d: Positive = Field(1.0, description="the clipping threshold: RMS(u) ≤ d")
    scale_parameter: bool = Field(False, description="scale the update by max(eps2, RMS(p))")
    relative_step: bool = Field(False, description="scale the update by min(1e-2, 1/√t) (then take lr 1)")


register(
    OpSpec(
        name="adafactor",
        lr=0.03,  # 0.027 measured (python -m opcomp.bench.sweep adafactor), as adamw's
        kind_lrs={"transformer": 0.003, "large_cnn": 0.003},
        on_shards="row and column means of whole matrices",
        kind=Kind.STATISTICAL,
        options=AdafactorOptions,
        state=(
            StateBuffer("exp_avg_sq_row", "rows", "row means of g², decayed (2-D and more)", nonnegative=True),
            StateBuffer("exp_avg_sq_col", "cols", "column means of g², decayed (2-D and more)", nonnegative=True),
            StateBuffer("exp_avg_sq", "param", "g², decayed (1-D)", nonnegative=True),
            StateBuffer("exp_avg", "param", "first moment of the clipped update (b1 > 0)"),
            _STEP,
        ),
        summary="Adafactor (Shazeer & Stern 2018): second moments factored into row and column means",
        formula="β₂ = 1 − t^decay; matrix view G (m × n): r ← β₂r + (1−β₂)·mean_cols(G² + eps1), c ← β₂c + "
        "(1−β₂)·mean_rows(G² + eps1), v̂ = r cᵀ/mean(r) (1-D: v ← β₂v + (1−β₂)(g² + eps1)); u = G/√v̂, "
        "u ← u/max(1, RMS(u)/d), ·max(eps2, RMS(p)) if scale_parameter, ·min(1e-2, 1/√t) if relative_step; "
        "with b1 > 0, m ← b1·m + (1−b1)·u and returns m",
    )
)


class ShampooOptions(Options):
    beta: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="factor decay: 1 sums them (the original), below 1 an EMA weighing the new term 1 − beta",
    )
    eps: Positive = Field(1e-6, description="added to each factor's diagonal before its root")
    exponent: Count = Field(2, description="e of the roots −1/(2e): 2 gives two-sided Shampoo's L^(−1/4) G R^(−1/4)")
    update_every: Count = Field(1, description="steps between factor updates")
    invert_every: Count = Field(1, description="steps between root computations")
    max_dim: Count = Field(
        8192,
        description="a side longer than this keeps its factor as diagonal blocks of max_dim × max_dim (full "
        "statistics within a block, none between; O(max_dim·side) memory), and the build says so",
    )


register(
    OpSpec(
        name="shampoo",
        on_shards="Kronecker factors of whole matrices",
        factor_block=lambda options: options.max_dim,
        kind=Kind.STATISTICAL,
        options=ShampooOptions,
        host_counted=True,
        state=(
            StateBuffer("L", "left", "left factor: sum (or EMA) of G Gᵀ (diagonal blocks over max_dim)"),
            StateBuffer("R", "right", "right factor: sum (or EMA) of Gᵀ G (diagonal blocks over max_dim)"),
            StateBuffer("L_root", "left", "(L + eps·I)^(−1/(2e)), as of the last root step (per block)"),
            StateBuffer("R_root", "right", "(R + eps·I)^(−1/(2e)), as of the last root step (per block)"),
            StateBuffer("diag", "param", "sum (or EMA) of g² (1-D)", nonnegative=True),
            _STEP,
        ),
        summary="Shampoo (Gupta et al. 2018): Kronecker factors of the gradient's own matrix view",
        formula="matrix view G (m × n): L ← beta·L + G Gᵀ, R ← beta·R + Gᵀ G (beta = 1: sums; beta < 1: the new "
        "term times 1 − beta) every update_every steps; u = (L + eps·I)^(−1/(2e)) G (R + eps·I)^(−1/(2e)), the "
        "roots by eigendecomposition every invert_every steps; a side over max_dim keeps its factor's diagonal blocks "
        "(each block rooted alone); 1-D: d ← beta·d + g², u = g ⊙ (d + eps)^(−1/2)",
    )
)


class SoapOptions(Options):
    b1: Beta = Field(0.95, description="first-moment decay")
    b2: Beta = Field(0.95, description="second-moment decay (in the eigenbasis)")
    shampoo_beta: Beta = Field(0.95, description="decay of the factors L and R")
    eps: Positive = Field(1e-8, description="added to √v")
    wd: NonNegative = Field(0.01, description="decoupled weight decay")
    precondition_frequency: Count = Field(10, description="steps between eigenbasis refreshes")
    max_dim: Count = Field(10_000, description="a side of the matrix view longer than this is not rotated")


register(
    OpSpec(
        name="soap",
        lr=0.01,  # 0.009 measured (python -m opcomp.bench.sweep soap)
        kind_lrs={"transformer": 0.005},  # the Bible's best, within 6% on GPT-2 and 2% on help text (docs/presets.md)
        on_shards="eigenbases of whole matrices",
        kind=Kind.STATISTICAL,
        options=SoapOptions,
        host_counted=True,
        state=(
            StateBuffer("exp_avg_rotated", "param", "first moment, in the eigenbasis"),
            StateBuffer("exp_avg_sq", "param", "second moment, in the eigenbasis", nonnegative=True),
            StateBuffer("L", "left", "EMA of G Gᵀ"),
            StateBuffer("R", "right", "EMA of Gᵀ G"),
            StateBuffer("Q_L", "left", "eigenbasis of L"),
            StateBuffer("Q_R", "right", "eigenbasis of R"),
            _STEP,
        ),
        summary="SOAP (Vyas et al. 2024): Adam in the eigenbasis of Shampoo's factors",
        formula="matrix view G: the first step only starts L, R (EMAs of G Gᵀ, Gᵀ G with shampoo_beta) and their "
        "eigenbases Q_L, Q_R (eigh, descending); then G' = Q_Lᵀ G Q_R, m' ← b1·m' + (1−b1)·G', "
        "v ← b2·v + (1−b2)·G'², u = √(1−b2ᵗ)/(1−b1ᵗ) · Q_L (m'/(√v + eps)) Q_Rᵀ + wd·p; after the update "
        "L, R take G, and every precondition_frequency steps Q ← qr(S·Q) (one power iteration, v's rows and "
        "columns reordered with the eigenvalues) and m' is rotated into the new basis (Q_newᵀ Q_old m' Q_oldᵀ "
        "Q_new); 1-D parameters and sides over max_dim are not rotated",
    )
)
