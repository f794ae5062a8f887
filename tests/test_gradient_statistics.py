"""The gradient-statistics family against independent implementations and their formulas:
Adafactor against transformers' ``Adafactor``, ``graft`` against its closed form."""

from __future__ import annotations

import pytest
import torch
from fisher import node_state
from torch import nn

import opcomp
from opcomp.ops.registry import REGISTRY


def embedding_net() -> nn.Module:
    """An Embedding (2-D, factored), Linears (2-D) and their biases (1-D)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(10, 6), nn.Flatten(), nn.Linear(18, 8), nn.Tanh(), nn.Linear(8, 3))


def train_side_by_side(pairs, steps: int = 20) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randint(0, 10, (5, 3), generator=generator), torch.randn(5, 3, generator=generator)
        for model, opt in pairs:
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()


@pytest.mark.parametrize(
    ("expression", "lr", "theirs"),
    [
        ("adafactor", 0.01, {"lr": 0.01, "beta1": None}),
        ("adafactor[b1=0.9]", 0.01, {"lr": 0.01, "beta1": 0.9}),
        (
            "adafactor[relative_step, scale_parameter]",
            1.0,
            {"lr": None, "relative_step": True, "scale_parameter": True},
        ),
    ],
)
def test_adafactor_equals_transformers_adafactor(expression, lr, theirs):
    from transformers.optimization import Adafactor

    ours_model, their_model = embedding_net(), embedding_net()
    ours = opcomp.build(expression, list(ours_model.parameters()), lr=lr)
    options = {"scale_parameter": False, "relative_step": False, "warmup_init": False, **theirs}
    reference = Adafactor(their_model.parameters(), **options)
    train_side_by_side([(ours_model, ours), (their_model, reference)])
    moved = max((a - b).abs().max() for a, b in zip(ours_model.parameters(), embedding_net().parameters()))
    assert moved > 0.05
    for a, b in zip(ours_model.parameters(), their_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adafactor_factors_a_conv_weight_as_its_matrix_view():
    """A Conv2d weight (out, in, kh, kw) is factored as out × in·kh·kw, as every matrix operator in
    opcomp views it; transformers factors its last two dimensions (kh × kw) instead."""
    conv = nn.Conv2d(2, 4, 3)
    opt = opcomp.build("adafactor", [conv.weight], lr=0.01)
    conv.weight.grad = torch.randn_like(conv.weight)
    opt.step()
    (entry,) = opt.state[conv.weight].values()
    assert entry["exp_avg_sq_row"].shape == (4,) and entry["exp_avg_sq_col"].shape == (18,)
    grad = conv.weight.grad.reshape(4, 18)
    square = grad * grad + 1e-30
    torch.testing.assert_close(entry["exp_avg_sq_row"], square.mean(1))  # the first step's β₂ is 0
    torch.testing.assert_close(entry["exp_avg_sq_col"], square.mean(0))


def test_graft_has_the_direction_of_its_first_argument_and_the_norm_of_its_second():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.zeros(4, 3)), nn.Parameter(torch.zeros(5))]
    opt = opcomp.build("graft(sign(g), 3 * g)", params, lr=1.0)
    for param in params:
        param.grad = torch.randn_like(param)
    grads = [p.grad.clone() for p in params]
    opt.step()
    for param, grad in zip(params, grads):
        expected = -(3 * grad).norm() / grad.sign().norm() * grad.sign()
        torch.testing.assert_close(param.detach(), expected)


def test_graft_of_a_zero_direction_is_zero_and_takes_its_second_arguments_learning_rate():
    param = nn.Parameter(torch.ones(3))
    opt = opcomp.build("graft(0 * g, adamw)", [param], lr=1.0)
    param.grad = torch.ones(3)
    opt.step()
    assert torch.equal(param.detach(), torch.ones(3))
    assert (
        opcomp.build("graft(sign(g), adamw)", [param]).param_groups[0]["lr"]
        == opcomp.build("adamw", [param]).param_groups[0]["lr"]
    )


def matrices_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8, bias=False), nn.Tanh(), nn.Linear(8, 3, bias=False))


def mse_steps(pairs, steps: int) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(5, 6, generator=generator), torch.randn(5, 3, generator=generator)
        for model, opt in pairs:
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()


def test_shampoo_equals_pytorch_optimizers_shampoo_on_matrices():
    """pytorch_optimizer's Shampoo keeps one factor per tensor dimension: on a matrix that is L and R
    with roots −1/4, opcomp's two-sided Shampoo. (On a vector it keeps a full d × d factor, where
    opcomp keeps the diagonal, as Shampoo's authors do for 1-D parameters.)"""
    from pytorch_optimizer import Shampoo

    ours_model, their_model = matrices_net(), matrices_net()
    ours = opcomp.build("shampoo[eps=1e-4]", list(ours_model.parameters()), lr=0.01)
    reference = Shampoo(
        their_model.parameters(), lr=0.01, momentum=0.0, preconditioning_compute_steps=1, matrix_eps=1e-4
    )
    mse_steps([(ours_model, ours), (their_model, reference)], steps=10)
    assert max((a - b).abs().max() for a, b in zip(ours_model.parameters(), matrices_net().parameters())) > 0.01
    for a, b in zip(ours_model.parameters(), their_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def inverse_root(matrix: torch.Tensor, power: float) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values ** (-1.0 / power)) @ vectors.T


@pytest.mark.parametrize("beta", [1.0, 0.9])
def test_shampoo_follows_its_formula_with_schedules_an_ema_and_a_conv_weights_matrix_view(beta):
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(3, 2, 2, 2, dtype=torch.float64))  # a conv weight: 3 × 8
    bias = nn.Parameter(torch.randn(3, dtype=torch.float64))
    eps, exponent, update_every, invert_every = 1e-3, 3, 2, 3
    schedule = f"update_every={update_every}, invert_every={invert_every}"
    expression = f"shampoo[beta={beta}, eps={eps}, exponent={exponent}, {schedule}]"
    opt = opcomp.build(expression, [weight, bias], lr=0.1)
    expected_w, expected_b = weight.detach().clone().reshape(3, 8), bias.detach().clone()
    left, right, diagonal = (
        torch.zeros(3, 3, dtype=torch.float64),
        torch.zeros(8, 8, dtype=torch.float64),
        torch.zeros(3, dtype=torch.float64),
    )
    new = 1.0 if beta == 1.0 else 1.0 - beta
    for step in range(7):
        weight.grad, bias.grad = torch.randn_like(weight), torch.randn_like(bias)
        g, b = weight.grad.reshape(3, 8), bias.grad
        if step % update_every == 0:
            left, right, diagonal = (
                beta * left + new * g @ g.T,
                beta * right + new * g.T @ g,
                beta * diagonal + new * b * b,
            )
        if step % invert_every == 0:
            roots = [
                inverse_root(s + eps * torch.eye(len(s), dtype=torch.float64), 2 * exponent) for s in (left, right)
            ]
        expected_w = expected_w - 0.1 * roots[0] @ g @ roots[1]
        expected_b = expected_b - 0.1 * b / (diagonal + eps).sqrt()
        opt.step()
    torch.testing.assert_close(weight.detach().reshape(3, 8), expected_w, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(bias.detach(), expected_b, rtol=1e-10, atol=1e-10)


class PooledConvNet(nn.Module):
    """A 1×1 Conv2d, pooled, and a Linear head: factors of full rank over a batch of 64."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(4, 6, 1), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).mean((2, 3)))


def pooled_conv_net() -> nn.Module:
    torch.manual_seed(0)
    return PooledConvNet()


def test_soap_with_its_defaults_equals_pytorch_optimizers_soap():
    """pytorch_optimizer.SOAP's defaults (lr 3e-3, betas (0.95, 0.95), shampoo_beta 0.95, weight
    decay 0.01 after the update, refresh every 10 steps) over 20 steps on a Linear and a Conv2d.
    The library rotates each dimension of a tensor; opcomp rotates a Conv2d weight's matrix view
    (out × in·kh·kw), which for a 1×1 kernel is the same. Rank-deficient factors (a batch smaller
    than a side) leave eigenvectors that rounding decides, so the batch here fills them."""
    from pytorch_optimizer import SOAP

    ours_model, their_model = pooled_conv_net(), pooled_conv_net()
    ours = opcomp.build("soap", list(ours_model.parameters()), lr=3e-3)
    reference = SOAP(their_model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        x, y = torch.randn(64, 4, 3, 3, generator=generator), torch.randn(64, 3, generator=generator)
        for model, opt in ((ours_model, ours), (their_model, reference)):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    assert max((a - b).abs().max() for a, b in zip(ours_model.parameters(), pooled_conv_net().parameters())) > 0.02
    for a, b in zip(ours_model.parameters(), their_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-6)


def heavyball_and_opcomp_soap(frequency: int, steps: int) -> tuple[list, list, float, object, object]:
    """heavyball.SOAP and opcomp's soap on one 3 × 4 matrix from one stream of gradients, at
    betas (0.95, 0.95), no weight decay and a refresh every ``frequency`` steps: each one's
    updates, the last step's t, and the two optimizers and parameters."""
    import heavyball

    heavyball.utils.compile_mode = None  # eager: heavyball compiles its kernels by default
    start = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    theirs, ours = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    reference = heavyball.SOAP(
        [theirs], lr=1e-2, betas=(0.95, 0.95), weight_decay=0.0, precondition_frequency=frequency, multi_tensor=False
    )
    opt = opcomp.build(f"soap[wd=0, precondition_frequency={frequency}]", [ours], lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    moves: tuple[list, list] = ([], [])
    for _ in range(steps):
        gradient = torch.randn(3, 4, generator=generator)
        for param, optimizer, moved in ((theirs, reference, moves[0]), (ours, opt, moves[1])):
            before = param.detach().clone()
            param.grad = gradient.clone()
            optimizer.step()
            moved.append(param.detach() - before)
    return moves[0], moves[1], steps, (reference, theirs), (opt, ours)


def test_heavyballs_soap_is_the_authors_where_its_conventions_agree_and_states_where_they_differ():
    """heavyball.SOAP against opcomp's soap (which equals the authors' code through
    pytorch_optimizer, above), on a 3 × 4 matrix: each factor's null space is at most a line, so
    no eigenvector is left to rounding. With a refresh every step the two take the same steps.
    The conventions that differ, each shown: (1) heavyball keeps each factor bias-corrected,
    L/(1 − βᵗ) — a scale its eigenbases do not see; (2) it refreshes when a running sum of
    1/frequency passes an integer, a step later than the authors' t mod frequency (and for a
    frequency of 10, a sum of 0.1s passes 1 a step later still), so at a frequency of 2 the
    steps part from the third on; (3) its defaults: betas (0.9, 0.95), a refresh every 2 steps
    and sides up to 2048, against the authors' (0.95, 0.95), 10 and 10,000."""
    import inspect

    import heavyball

    theirs, ours, steps, (reference, their_param), (opt, our_param) = heavyball_and_opcomp_soap(1, 15)
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)  # steps of ~1e-2, fp32 eigh and QR apart
    (their_state,) = reference.state[their_param].values()
    their_l = next(v for k, v in their_state.items() if k.startswith("scale_by_soap_GG"))[0][0]
    torch.testing.assert_close(their_l, node_state(opt, our_param, "soap")["L"] / (1 - 0.95**steps))
    theirs, ours, _, _, _ = heavyball_and_opcomp_soap(2, 4)
    torch.testing.assert_close(theirs[1], ours[1])
    assert torch.nn.functional.cosine_similarity(theirs[2].flatten(), ours[2].flatten(), 0) < 0.9
    defaults = inspect.signature(heavyball.SOAP).parameters
    spec = REGISTRY["soap"].options()
    assert (defaults["betas"].default, (spec.b1, spec.b2)) == ((0.9, 0.95), (0.95, 0.95))
    assert (defaults["precondition_frequency"].default, spec.precondition_frequency) == (2, 10)
    assert (defaults["max_precond_dim"].default, spec.max_dim) == (2048, 10_000)


def test_soap_rotates_a_conv_weights_matrix_view_and_leaves_a_side_over_max_dim_alone():
    conv = nn.Conv2d(2, 4, 3)
    opt = opcomp.build("soap[max_dim=10]", [conv.weight], lr=1e-3)
    for _ in range(2):
        conv.weight.grad = torch.randn_like(conv.weight)
        opt.step()
    (entry,) = opt.state[conv.weight].values()
    assert entry["L"].shape == entry["Q_L"].shape == (4, 4)
    assert "R" not in entry and "Q_R" not in entry  # 2·3·3 = 18 columns > max_dim
    torch.testing.assert_close(entry["Q_L"].T @ entry["Q_L"], torch.eye(4), atol=1e-5, rtol=0)


FAMILY = [
    "adafactor[b1=0.9]",
    "shampoo[update_every=2, invert_every=3, max_dim=4]",  # a conv weight's columns in padded blocks
    "soap[precondition_frequency=2]",
    "graft(shampoo, adam) + 0.01 * p",
]


def conv_and_linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 4))


def conv_batches(count: int):
    generator = torch.Generator().manual_seed(2)
    return [
        (torch.randn(16, 2, 4, 4, generator=generator), torch.randn(16, 4, generator=generator)) for _ in range(count)
    ]


def run(model, opt, batches) -> None:
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("expression", FAMILY)
def test_a_resumed_optimizer_of_the_family_continues_bitwise(expression):
    import io

    batches = conv_batches(8)
    straight = conv_and_linear()
    run(straight, opcomp.build(expression, straight, lr=0.01), batches)
    first = conv_and_linear()
    opt = opcomp.build(expression, first, lr=0.01)
    run(first, opt, batches[:4])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = conv_and_linear()
    resumed.load_state_dict(saved["model"])
    opt = opcomp.build(expression, resumed, lr=0.01)
    opt.load_state_dict(saved["opt"])
    run(resumed, opt, batches[4:])
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("expression", FAMILY)
def test_a_non_finite_gradient_skips_the_familys_step_and_changes_nothing(expression):
    import copy

    model = conv_and_linear()
    opt = opcomp.build(expression, model, lr=0.01)
    run(model, opt, conv_batches(3))
    params, state = [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())
    x, y = conv_batches(4)[3]
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    model[3].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    after = opt.state_dict()["state"]
    assert {i: set(e) for i, e in after.items()} == {i: set(e) for i, e in state["state"].items()}
    for index, entries in state["state"].items():
        for key, buffers in entries.items():
            for name, value in buffers.items():
                assert torch.equal(after[index][key][name], value), (index, key, name)
    assert opt.skipped_steps == 1


def block_diagonal(matrix: torch.Tensor, block: int) -> torch.Tensor:
    """``matrix`` (d, d) with everything outside its diagonal blocks of ``block`` set to zero."""
    index = torch.arange(matrix.shape[-1]) // block
    return matrix * (index.unsqueeze(0) == index.unsqueeze(1))


def matrix_power(matrix: torch.Tensor, power: float) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.pow(power)) @ vectors.T


@pytest.mark.parametrize("shape, max_dim", [((7, 5), 3), ((4, 3, 3, 2), 5), ((5, 9), 9)])
def test_shampoo_keeps_sides_over_max_dim_as_diagonal_blocks_of_its_factors(shape, max_dim):
    """Three steps of shampoo[max_dim=k] against the formula with block-diagonal sums of G Gᵀ
    and Gᵀ G (sides of 7 in blocks of 3 and a conv weight's 18 columns in blocks of 5: padded
    last blocks; 9 ≤ 9 whole), their roots of the whole block-diagonal matrices, in float64."""
    param = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    opt = opcomp.build(f"shampoo[max_dim={max_dim}, eps=0.01]", [param], lr=1.0)
    generator = torch.Generator().manual_seed(1)
    left = right = 0
    for _ in range(3):
        gradient = torch.randn(shape, generator=generator, dtype=torch.float64)
        matrix = gradient.reshape(shape[0], -1)
        left, right = left + matrix @ matrix.T, right + matrix.T @ matrix
        roots = [
            matrix_power(block_diagonal(factor, max_dim) + 0.01 * torch.eye(len(factor), dtype=torch.float64), -0.25)
            for factor in (left, right)
        ]
        before = param.detach().clone()
        param.grad = gradient
        opt.step()
        torch.testing.assert_close(before - param.detach(), (roots[0] @ matrix @ roots[1]).reshape(shape))
    stored = node_state(opt, param, "shampoo")["L"]
    assert stored.shape == ((3, 3, 3) if shape == (7, 5) else (shape[0],) * 2)


def test_shampoo_keeps_a_side_over_max_dim_in_blocks_and_says_so_at_build():
    """An Embedding of 8,193 rows (over the 8,192 default): its left factor in 2 blocks of 8,192,
    said at build with what they take against the whole factor; soap leaves the side unrotated."""
    model = nn.Sequential(nn.Embedding(8193, 4), nn.Linear(4, 3))
    with pytest.warns(opcomp.OpcompWarning) as said:
        opcomp.build("shampoo", model)
    (line,) = [str(w.message) for w in said if "diagonal blocks" in str(w.message)]
    assert "shampoo keeps 1 factor of sides over max_dim=8192 as diagonal blocks of 8192 × 8192" in line
    assert "0.weight (8193: 2 blocks of 8192)" in line and "(512.0 MiB in fp32" in line and "256.1 MiB)" in line
    opcomp.build("soap", model)  # its max_dim leaves the long side unrotated


@pytest.mark.parametrize("expression", FAMILY)
def test_the_family_steps_bfloat16_parameters_in_fp32_and_rounds_once(expression):
    """Two steps on bfloat16 parameters equal the same steps on their fp32 values with the result
    rounded to bfloat16 after each: state and arithmetic in fp32, one rounding per step."""
    torch.manual_seed(0)
    low = [nn.Parameter(torch.randn(6, 5).bfloat16()), nn.Parameter(torch.randn(5).bfloat16())]
    high = [nn.Parameter(p.detach().float()) for p in low]
    opt_low, opt_high = (opcomp.build(expression, params, lr=0.01) for params in (low, high))
    for _ in range(2):
        grads = [torch.randn(p.shape).bfloat16() for p in low]
        for p, q, g in zip(low, high, grads):
            p.grad, q.grad = g, g.float()
        opt_low.step()
        opt_high.step()
        with torch.no_grad():
            for q in high:
                q.copy_(q.bfloat16().float())
    for p, q in zip(low, high):
        assert p.dtype == torch.bfloat16
        assert torch.equal(p.float(), q.detach())
    for entries in opt_low.state.values():
        for buffers in entries.values():
            assert all(t.dtype == torch.float32 for t in buffers.values())


@pytest.mark.compile
def test_adafactor_compiled_steps_as_it_does_eagerly():
    """adafactor counts on the device, so its family compiles (shampoo and soap count on the host
    and step eagerly); the compiled step equals the eager one within inductor's reassociation."""
    import warnings

    def run(mode: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(6, 5)), nn.Parameter(torch.randn(5))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the compile notice
            opt = opcomp.build("adafactor[b1=0.9] + 0.01 * p", params, lr=0.01, compile=mode)
            generator = torch.Generator().manual_seed(1)
            for _ in range(4):
                for param in params:
                    param.grad = torch.randn(param.shape, generator=generator)
                opt.step()
        return [p.detach() for p in params]

    for eager, compiled in zip(run("off"), run("on")):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
