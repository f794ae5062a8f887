"""Bad inputs and edge cases: nothing partially applied, no NaN, clear errors at build time."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import shapes
import torch
from device_reads import counted_reads
from torch import nn
from torch.nn import functional as F

import opcomp
from opcomp.kernels import decompositions as layers

RUNNABLE = [
    "g",
    "p",
    "ema[debias](g)",
    "momentum[nesterov](g)",
    "adam",
    "adamw",
    "rms",
    "diag_fisher(g)",
    "sign(g)",
    "normalize(g)",
    "clip(g)",
    "reject(g, p)",
    "project(g, p)",
    "orth(g) | g",
    "muon(g) | adamw",
    "adarmsuon | adam",
    "0.5 * adam - 2 * sign(g) + p",
]


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def snapshot(opt: opcomp.Optimizer):
    return copy.deepcopy(opt.state_dict()["state"])


def same_state(a, b) -> bool:
    if a.keys() != b.keys():
        return False
    for index in a:
        for key in a[index]:
            for name, tensor in a[index][key].items():
                if not torch.equal(tensor, b[index][key][name]):
                    return False
    return True


def backward(model: nn.Module, scale: float = 1.0) -> None:
    x = torch.linspace(-1, 1, 12).reshape(3, 4)
    (model(x).square().sum() * scale).backward()


@pytest.mark.parametrize("expression", RUNNABLE)
def test_zero_gradients_and_zero_inputs_never_give_nan(expression):
    model = net()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    opt = opcomp.build(expression, model, lr=0.1)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for entries in opt.state_dict()["state"].values():
        for buffers in entries.values():
            assert all(torch.isfinite(t).all() for t in buffers.values())


@pytest.mark.parametrize(
    ("expression", "compiling"),
    [
        ("0.5 * muon(adam(g)) + 0.5 * adam(g) | adamw", "off"),
        pytest.param("0.5 * muon(adam(g)) + 0.5 * adam(g) | adamw", "on", marks=pytest.mark.compile),
        ("fog", "off"),  # layer statistics: checks decided once, at the step's end
        ("adamw", "off"),  # torch's fused kernel, told by the flag
        ("adam(g) + 0.1 * p", "on"),  # the same kernel whatever compile says
    ],
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_gradient_skips_the_whole_step_bitwise(bad, expression, compiling):
    model = net()
    opt = opcomp.build(expression, model, lr=0.1, compile=compiling)
    for _ in range(2):  # compiled: the second step is the self-checking graph
        opt.zero_grad()
        backward(model)
        opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    state = snapshot(opt)
    opt.zero_grad()
    backward(model)
    list(model.parameters())[-1].grad[0] = bad
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        opt.step()
    assert opt.skipped_steps == 2
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert same_state(state, snapshot(opt))


def test_a_layer_step_reads_the_device_once_and_its_step_counts_never():
    model = net()
    opt = opcomp.build("fog", model, lr=0.1)
    for _ in range(3):
        backward(model)
        opt.step()
    with counted_reads() as reads:
        for _ in range(5):
            backward(model)
            opt.step()
    assert reads == ["__bool__"] * 5  # the step's finiteness, decided at its end


@pytest.mark.parametrize("model_name", ["mlp", "strided_conv", "token_model"])
@pytest.mark.parametrize(
    ("statistic", "refresh_read"),
    [
        ("kfac[invert_every=2]", "tolist"),
        ("kfac[damping_mode=exact, invert_every=2]", "__bool__"),
        ("ekfac[invert_every=2]", "__bool__"),
    ],
)
def test_a_refresh_reads_the_device_once_however_many_factor_sizes_it_decomposes(model_name, statistic, refresh_read):
    """π-split damping stays on the device; every batched Cholesky (one per distinct factor size)
    reports whether it needs the eigendecomposition fallback in one read for them all, and
    eigenbases check all their factors finite in one read."""
    model = shapes.make(model_name)
    x, y = shapes.batch(model_name)
    expression = f"{statistic}(g) | adamw"
    opt = opcomp.build(expression, model, lr=0.01)
    counts = []
    for _ in range(4):
        with counted_reads() as reads:
            opt.zero_grad()
            shapes.loss(model, x, y).backward()
            opt.step()
        counts.append(reads)
    key = next(n.state_key for n in opcomp.lower(expression).nodes if n.op == statistic.split("[")[0])
    sizes = {tuple(b[f].shape) for e in opt.state.values() if key in e for b in [e[key]] for f in "AG" if f in b}
    assert len({s for s in sizes if len(s) == 2}) >= 2  # more than one batch to decompose
    assert counts[2] == [refresh_read, "__bool__"]  # a refresh, then the step's finiteness
    assert counts[3] == ["__bool__"]


def test_only_the_factors_whose_cholesky_fails_take_the_eigendecomposition():
    """Two sizes, one factor in each that fp32 Cholesky cannot factor (rank one: [[1, 1], [1, 1]]
    and its 3 × 3 kin): those get V diag(1/max(λ, tiny)) Vᵀ, the rest their inverse, against
    float64 numbers computed here. Every batch's failure is read in one go; then, only because
    some failed, whether those hold inf or NaN (a NaN fails Cholesky too, and ends the step)."""
    tiny = torch.finfo(torch.float32).tiny

    def spd(n: int, seed: int) -> torch.Tensor:
        x = torch.randn(n, 2 * n, generator=torch.Generator().manual_seed(seed))
        return x @ x.T / (2 * n) + 0.1 * torch.eye(n)

    matrices = [spd(2, 0), torch.ones(2, 2), spd(3, 1), torch.ones(3, 3), spd(3, 2)]
    with counted_reads() as reads:
        inverses = [inverse for (inverse,) in layers.damped_inverses(matrices)]
    assert reads == ["tolist", "__bool__"]
    for matrix, inverse in zip(matrices, inverses):
        values, vectors = torch.linalg.eigh(matrix.double())
        if values.min() > 1e-6:
            torch.testing.assert_close(inverse.double(), torch.linalg.inv(matrix.double()), rtol=1e-4, atol=1e-4)
        else:  # 1/tiny on the null space, 1/λ elsewhere
            expected = vectors @ torch.diag(1.0 / values.clamp_min(tiny)) @ vectors.T
            torch.testing.assert_close(inverse.double(), expected, rtol=1e-3, atol=0.0)


@pytest.mark.parametrize("model_name", ["mlp", "strided_conv", "token_model"])
@pytest.mark.parametrize(
    "expression",
    [
        "muon(kfac[invert_every=2](g)) | adamw",
        "kfac[damping_mode=exact, invert_every=2, update_every=2](g) | g",
        "kfac[bf16, invert_every=2](g) | g",
        "ekfac[invert_every=2](g) | g",
        "diag_kfac(g) | adamw",
    ],
)
def test_operators_that_replace_their_state_never_write_into_it(model_name, expression):
    # A step's snapshot shares these nodes' tensors instead of cloning them (OpSpec.replaces_state),
    # so a skipped step is undone only if no kernel writes into a tensor it found in the state.
    model = shapes.make(model_name)
    x, y = shapes.batch(model_name)
    opt = opcomp.build(expression, model, lr=0.01)
    replacing = {n.state_key for n in opcomp.lower(expression).nodes if n.spec.replaces_state}
    assert replacing
    for _ in range(5):  # statistics, refreshes and steps between them
        found = [
            (t, t._version)
            for entries in opt.state.values()
            for key, buffers in entries.items()
            if key in replacing
            for t in buffers.values()
        ]
        opt.zero_grad()
        shapes.loss(model, x, y).backward()
        opt.step()
        assert all(t._version == version for t, version in found)
    assert found  # the last step had state to keep


def test_parameters_without_a_gradient_are_skipped():
    model = net()
    opt = opcomp.build("adamw", model, lr=0.1)
    frozen = list(model.parameters())[0]
    before = frozen.detach().clone()
    backward(model)
    frozen.grad = None
    opt.step()
    assert torch.equal(frozen, before)
    assert not opt.state[frozen]
    assert all(opt.state[p] for p in list(model.parameters())[1:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_keep_fp32_state(dtype):
    model = net().to(dtype)
    reference = net()
    opt = opcomp.build("muon(g) | adamw", model, lr=0.01)
    opt32 = opcomp.build("muon(g) | adamw", reference, lr=0.01)
    for _ in range(3):
        for m, o in ((model, opt), (reference, opt32)):
            o.zero_grad()
            x = torch.linspace(-1, 1, 12).reshape(3, 4).to(next(m.parameters()).dtype)
            m(x).float().square().sum().backward()
            o.step()
    for p in model.parameters():
        assert p.dtype == dtype
        for buffers in opt.state[p].values():
            assert all(t.dtype == torch.float32 for name, t in buffers.items())
    worst = max((a.float() - b).abs().max().item() for a, b in zip(model.parameters(), reference.parameters()))
    assert worst < 0.05  # the same optimizer, within low-precision rounding


def test_an_operator_that_cannot_apply_fails_at_build_naming_the_parameter():
    with pytest.raises(opcomp.OpcompError) as caught:
        opcomp.build("muon(g)", net())
    message = str(caught.value)
    assert "'muon' cannot apply to parameter '0.bias' (shape (8,), in a Linear)" in message
    assert "'muon(g) | adamw(g)'" in message and "rule" in message


def test_layer_operators_need_the_model_and_say_so():
    with pytest.raises(opcomp.OpcompError, match=r"build with the module, opcomp.build\(expr, model\)"):
        opcomp.build("fog", net().parameters())


def test_keyword_options_set_options_of_a_bare_name():
    model = net()
    opt = opcomp.build("adamw", model, lr=0.01, wd=0.1, b1=0.8)
    assert opt.param_groups[0]["expr"] == "adamw[b1=0.8, b2=0.999, eps=1e-08, wd=0.1](g)"
    with pytest.raises(opcomp.OpcompError, match="need a bare operator or preset name"):
        opcomp.build("muon(g) | adamw", model, wd=0.1)
    with pytest.raises(opcomp.UnknownOptionError, match="did you mean 'wd'"):
        opcomp.build("adamw", model, wdd=0.1)


def test_the_learning_rate_defaults_to_the_presets_recommendation():
    assert opcomp.build("fog", net()).param_groups[0]["lr"] == opcomp.presets().note("fog").lr == 0.03
    assert opcomp.build("sam_sgd[rho=0.1]", net()).param_groups[0]["lr"] == 0.1
    assert opcomp.build("adamw", net()).param_groups[0]["lr"] == 0.03  # a bare operator's own
    assert opcomp.build("adamw(g + reject(hvp(g), g))", net()).param_groups[0]["lr"] == 0.03  # its outermost
    assert opcomp.build("muon(g) | adamw", net()).param_groups[0]["lr"] == 0.03  # its first branch
    assert opcomp.build("0.5 * adam(g) + 0.5 * rms(g)", net()).param_groups[0]["lr"] == 1e-3  # no single scale
    assert opcomp.build("fog", net(), lr=0.5).param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("lr", [-1.0, float("nan"), "0.1"])
def test_a_bad_learning_rate_is_refused(lr):
    with pytest.raises(opcomp.OpcompError, match="learning rate"):
        opcomp.build("adamw", net(), lr=lr)


def test_empty_and_frozen_models_are_refused():
    model = net()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(opcomp.OpcompError, match="no parameters"):
        opcomp.build("adamw", model)


def test_step_with_a_closure_returns_its_loss():
    model = net()
    opt = opcomp.build("adamw", model, lr=0.01)

    def closure():
        opt.zero_grad()
        loss = model(torch.ones(2, 4)).square().sum()
        loss.backward()
        return loss

    first = opt.step(closure)
    assert isinstance(first, torch.Tensor) and opt.step(closure) < first


def test_sparse_gradients_are_a_clear_error():
    embedding = nn.Embedding(10, 3, sparse=True)
    opt = opcomp.build("adamw", embedding, lr=0.1)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(opcomp.OpcompError, match="sparse"):
        opt.step()


def test_huge_but_finite_gradients_are_not_mistaken_for_non_finite_ones():
    model = net()
    opt = opcomp.build("sign(g)", model, lr=0.1)
    for p in model.parameters():
        p.grad = torch.full_like(p, 3e38)  # finite, but any sum overflows
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert opt.skipped_steps == 0
    assert all(torch.equal(b - 0.1, a) for a, b in zip(model.parameters(), before))


def test_a_tensor_learning_rate_works_like_a_float():
    results = []
    for lr in (0.1, torch.tensor(0.1)):
        model = net()
        opt = opcomp.build("adamw", model, lr=lr)
        backward(model)
        opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_automatic_compilation_falls_back_to_eager_when_the_compiler_fails(monkeypatch):
    from opcomp.step import compiled as execute

    def broken(graph, programs):
        def run(*arguments):
            raise RuntimeError("no C compiler here")

        return run

    monkeypatch.setattr(execute, "compiled", broken)
    # "auto" leaves the CPU eager: let it compile here, as it would on CUDA
    monkeypatch.setattr(execute.Compiled, "compiles", lambda self, items: self.compile != "off")
    reference, model = net(), net()
    eager = opcomp.build("lion", reference, lr=0.01, compile="off")  # adamw would run torch's fused kernel
    automatic = opcomp.build("lion", model, lr=0.01, compile="auto")
    for _ in range(2):  # a compiled family steps eagerly once first, making its state
        backward(reference)
        eager.step()
    backward(model)
    automatic.step()
    backward(model)
    with pytest.warns(RuntimeWarning, match="no C compiler here"):
        automatic.step()
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), model.parameters()))
    forced_model = net()
    forced = opcomp.build("lion", forced_model, lr=0.01, compile="on")
    backward(forced_model)
    forced.step()
    backward(forced_model)
    with pytest.raises(RuntimeError, match="no C compiler here"):
        forced.step()


@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.float32, torch.bfloat16, torch.float64)])
@pytest.mark.parametrize("expanded", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None])
def test_the_fused_kernels_flag_is_exact_and_leaves_the_gradients_as_they_were(bad, dtypes, expanded):
    """torch's GradScaler check (all fp32, contiguous) or opcomp's own (mixed dtypes, a gradient
    expanded from one row): 1.0 exactly when some element is inf or NaN; the largest finite
    values count as finite."""
    from opcomp.finite import non_finite

    for where in range(len(dtypes)):
        grads = [torch.randn(9, 7, dtype=dtype) for dtype in dtypes]
        grads[where][4, 2] = torch.finfo(dtypes[where]).max if bad is None else bad
        if expanded:
            grads.append(torch.ones(1, 7).expand(9, 7))
        before = [g.clone() for g in grads]
        assert float(non_finite(grads)) == (0.0 if bad is None else 1.0)
        for a, b in zip(grads, before):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("expression", ["adamw", "muon(g) | adamw", "fog"])
def test_a_skipped_first_step_leaves_no_state(expression):
    model = net()
    opt = opcomp.build(expression, model, lr=0.1)
    backward(model)
    list(model.parameters())[0].grad[0] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert opt.skipped_steps == 1 and opt.state_dict()["state"] == {}


def test_an_empty_parameter_beside_a_non_finite_gradient_still_skips_the_step():
    empty, full = nn.Parameter(torch.ones(0)), nn.Parameter(torch.ones(3))
    opt = opcomp.build("sgd", [empty, full], lr=0.1)
    empty.grad, full.grad = torch.zeros(0), torch.tensor([1.0, float("inf"), 1.0])
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert opt.skipped_steps == 1
    assert torch.equal(full, torch.ones(3))


@pytest.mark.parametrize("compile_mode", ["off", "on"])
def test_float64_parameters_step_in_float64_as_torch_adamw_does(compile_mode):
    results = []
    for make in (
        lambda m: opcomp.build("adamw", m, lr=0.01, compile=compile_mode),
        lambda m: torch.optim.AdamW(m.parameters(), lr=0.01),
    ):
        model = net().double()
        opt = make(model)
        for _ in range(20):
            opt.zero_grad()
            x = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(3, 4)
            model(x).square().sum().backward()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for ours, theirs in zip(*results):
        assert ours.dtype == torch.float64
        # fp32 arithmetic anywhere in the step would leave differences near 1e-8
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-13)


@pytest.mark.parametrize("expression", ["sam(ema(g))", "sam_sgd", "asam_sgd", "sam[fisher](adamw)", "grad_at(g)"])
def test_probed_gradients_of_bf16_parameters_are_upcast_and_all_state_is_fp32(expression):
    model, reference = net().to(torch.bfloat16), net()
    x = torch.linspace(-1, 1, 12).reshape(3, 4)
    low = opcomp.build(expression, model, lr=0.01)
    full = opcomp.build(expression, reference, lr=0.01)
    for _ in range(3):
        low.step(lambda: model(x.bfloat16()).float().square().sum())
        full.step(lambda: reference(x).square().sum())
    for param in model.parameters():
        assert param.dtype == torch.bfloat16
        assert all(t.dtype == torch.float32 for buffers in low.state[param].values() for t in buffers.values())
    worst = max((a.float() - b).abs().max().item() for a, b in zip(model.parameters(), reference.parameters()))
    assert worst < 0.05  # the same optimizer, within bf16 rounding


@pytest.mark.parametrize("shape", [(16, 0), (0, 16)])
@pytest.mark.parametrize("expression", ["muon(g)", "orth(g)", "adarmsuon(g)"])
def test_empty_matrices_step_beside_full_ones(expression, shape):
    empty, full = nn.Parameter(torch.zeros(shape)), nn.Parameter(torch.linspace(-1, 1, 9).reshape(3, 3))
    alone = nn.Parameter(full.detach().clone())
    together = opcomp.build(expression, [empty, full], lr=0.1)
    reference = opcomp.build(expression, [alone], lr=0.1)
    empty.grad, full.grad, alone.grad = torch.zeros(shape), torch.eye(3), torch.eye(3)
    together.step()
    reference.step()
    assert empty.shape == shape and torch.equal(full, alone)


def bias_only_reference(layer: nn.Linear, x, y, damping: float) -> torch.Tensor:
    """KFAC of a bias alone: A = E[1·1] = 1, G = E_n[∇b_n ∇b_nᵀ] from per-example bias gradients
    (torch.func), π-split damping; the direction is (G + λ_G I)⁻¹ ∇b / (1 + λ_A)."""
    from fisher import per_example_gradients

    examples = per_example_gradients(layer, lambda out, t: F.cross_entropy(out, t), x, y)["bias"]
    g = examples.T @ examples / len(x)
    pi = (1.0 / (g.trace() / g.shape[0])).sqrt()
    lambda_a, lambda_g = pi * damping**0.5, damping**0.5 / pi
    gradient = torch.autograd.grad(F.cross_entropy(layer(x), y), layer.bias)[0]
    return torch.linalg.solve(g + lambda_g * torch.eye(len(g)), gradient) / (1 + lambda_a)


def test_a_kfac_node_that_receives_only_a_layers_bias_preconditions_it_alone():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    expected = bias_only_reference(layer, x, y, damping=1e-3)
    before = layer.bias.detach().clone()
    opt = opcomp.build("muon(g) | kfac(g) | g", layer, lr=1.0)  # the weight to muon, the bias to kfac
    assert opt.assignments() == {"weight": "muon", "bias": "kfac"}
    F.cross_entropy(layer(x), y).backward()
    opt.step()
    torch.testing.assert_close(before - layer.bias.detach(), expected, rtol=1e-4, atol=1e-6)


def test_weight_and_bias_in_groups_with_different_kfac_nodes_each_get_their_own_block():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    expected = bias_only_reference(layer, x, y, damping=0.01)
    before = layer.bias.detach().clone()
    groups = [{"params": [layer.weight], "expr": "kfac(g)"}, {"params": [layer.bias], "expr": "kfac[damping=0.01](g)"}]
    opt = opcomp.build("adamw", groups, model=layer, lr=1.0)
    F.cross_entropy(layer(x), y).backward()
    opt.step()
    torch.testing.assert_close(before - layer.bias.detach(), expected, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(layer.weight).all()


@pytest.mark.parametrize("expression", ["kfac(g) | g", "diag_kfac(g) | g", "ekfac(g) | g", "fog"])
def test_layers_with_no_inputs_keep_only_their_bias_block(expression):
    """nn.Linear(0, 3): X is the bias column alone and A = [1], so the bias steps as a lone bias does."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: initializing zero-element tensors is a no-op
        empty = nn.Linear(0, 3)
    x, y = torch.zeros(12, 0), torch.randint(0, 3, (12,))
    opt = opcomp.build(expression, empty, lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(empty(x), y).backward()
        opt.step()
    assert empty.weight.shape == (3, 0) and torch.isfinite(empty.bias).all()


@pytest.mark.parametrize("expression", ["awzo", "zo[newton]"])
def test_zeroth_order_newton_on_a_loss_that_is_exactly_zero_does_not_move(expression):
    model = net()
    before = [p.detach().clone() for p in model.parameters()]
    opt = opcomp.build(expression, model, lr=0.1)
    opt.step(lambda: model(torch.ones(2, 4)).sum() * 0.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_state_dict_for_parameters_of_other_shapes_is_refused_whole():
    source, target = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 4)), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 6))
    saved_opt = opcomp.build("adamw", source, lr=0.1)
    source(torch.ones(2, 4)).sum().backward()
    saved_opt.step()
    opt = opcomp.build("adamw", target, lr=0.1)
    target(torch.ones(2, 4)).sum().backward()
    opt.step()
    state = snapshot(opt)
    with pytest.raises(opcomp.OpcompError, match=r"parameter '0.weight' does not fit this model: 'adamw' buffer"):
        opt.load_state_dict(saved_opt.state_dict())
    assert same_state(state, snapshot(opt))  # nothing half-loaded


def test_a_state_dict_with_layer_statistics_of_other_shapes_is_refused():
    saved_model, model = (
        nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3)),
        nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3)),
    )
    saved_opt = opcomp.build("kfac(g)", saved_model, lr=0.1)
    F.cross_entropy(saved_model(torch.ones(2, 4)), torch.tensor([0, 1])).backward()
    saved_opt.step()
    saved = saved_opt.state_dict()
    key = next(k for k in saved["state"][0] if k.startswith("kfac["))
    saved["state"][0][key]["A"] = torch.eye(4)  # the layer's A is 5 × 5 (bias folded in)
    with pytest.raises(opcomp.OpcompError, match=r"'kfac' buffer 'A' has shape \(4, 4\), here it is \(5, 5\)"):
        opcomp.build("kfac(g)", model, lr=0.1).load_state_dict(saved)


def test_a_closure_that_raises_during_a_probe_leaves_the_state_as_it_was():
    model = net()
    opt = opcomp.build("zo", model, lr=0.1)
    x = torch.ones(2, 4)
    opt.step(lambda: model(x).sum())
    state, params = snapshot(opt), [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("data loader failed")
        return model(x).sum()

    with pytest.raises(ValueError, match="data loader failed"):
        opt.step(closure)
    assert same_state(state, snapshot(opt))  # the step counter (the noise seed) did not advance
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))


def test_gauss_newton_probes_with_a_closure_that_never_calls_the_model_say_so():
    model = net()
    opt = opcomp.build("adagnoema", model, lr=0.1)
    weights = list(model.parameters())
    with pytest.raises(opcomp.OpcompError, match="the closure must call the model given to opcomp.build"):
        opt.step(lambda: sum(w.square().sum() for w in weights))


def test_a_set_of_parameters_is_refused_like_a_set_in_a_group():
    with pytest.raises(opcomp.OpcompError, match="pass a list"):
        opcomp.build("adamw", set(net().parameters()))
    with pytest.raises(opcomp.OpcompError, match="pass a list"):
        opcomp.build("adamw", [{"params": set(net().parameters())}], lr=0.1)


@pytest.mark.parametrize("model_name", ["mlp", "strided_conv", "token_model"])
@pytest.mark.parametrize(
    "statistic",
    ["kfac[update_every=2, invert_every=3]", "diag_kfac[update_every=2]", "ekfac[invert_every=2]", "kfac[bf16]"],
)
def test_a_step_decided_on_the_device_reads_nothing_and_keeps_what_a_host_decided_step_keeps(
    model_name, statistic, monkeypatch
):
    """How a step with layer statistics runs on CUDA, forced here on the CPU: its checks become
    one device flag that masks the parameters' update and every state buffer it changed, and the
    host learns the outcome only when a count needs it. Against the same optimizer deciding on
    the host, over steps whose gradients are NaN on some: bit-identical parameters, state and
    skip count, and no read in a step that neither refreshes nor creates state."""
    from opcomp.step import transactional as module

    expression = f"muon({statistic}(g)) | adamw"  # buffers written in place (momentum, Adam's) beside replaced ones
    x, y = shapes.batch(model_name)
    runs = {}
    for on_device in (False, True):
        monkeypatch.setattr(module, "decides_on_device", lambda params, answer=on_device: answer)
        model = shapes.make(model_name)
        opt = opcomp.build(expression, model, lr=0.01)
        reads = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the skip warning
            for step in range(9):
                with counted_reads() as seen:
                    opt.zero_grad()
                    shapes.loss(model, x, y).backward()
                    if step in (2, 5, 6):
                        next(model.parameters()).grad.view(-1)[0] = float("nan")
                    opt.step()
                reads.append(seen)
        runs[on_device] = (model, opt, reads)
    (host_model, host_opt, host_reads), (device_model, device_opt, reads) = runs[False], runs[True]
    for a, b in zip(host_model.parameters(), device_model.parameters()):
        assert torch.equal(a, b)
    host_state, device_state = host_opt.state_dict()["state"], device_opt.state_dict()["state"]
    for index, entries in host_state.items():
        for key, buffers in entries.items():
            for name, tensor in buffers.items():
                assert torch.equal(tensor, device_state[index][key][name]), (index, key, name)
    assert host_opt.skipped_steps == device_opt.skipped_steps == 3
    # a host-decided step reads its checks last; after the first (which creates the state) the
    # device-decided ones read only what a refresh reads
    assert all(host[-1] == "__bool__" for host in host_reads)
    assert [seen for seen in reads[1:]] == [host[:-1] for host in host_reads[1:]]
    assert [] in reads[1:]  # steps without a refresh read nothing


@pytest.mark.parametrize("expression", ["adamw", "lion", "fog", "muon(g) | adamw"])
def test_the_skip_warning_points_at_the_users_step_call(expression):
    model = net()
    opt = opcomp.build(expression, model, lr=0.1)
    backward(model)
    list(model.parameters())[0].grad[0] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped") as caught:
        opt.step()
    assert {Path(w.filename).name for w in caught if "skipped" in str(w.message)} == {Path(__file__).name}
