"""Probe operators against independent references: torch.autograd.functional, explicit matrices,
and the SAM / FS-AdaRMSuon / F3EO formulas computed naively."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian, hvp
from torch.func import functional_call, jacrev
from torch.nn import functional as F
from torch.optim._muon import _zeropower_via_newtonschulz

import opcomp


def tiny(seed: int = 0, bias: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4, bias=bias), nn.Tanh(), nn.Linear(4, 2, bias=bias))


def batch(seed: int = 1, size: int = 6):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, generator=generator), torch.randint(0, 2, (size,), generator=generator)


def loss_of(model, x, y):
    return F.cross_entropy(model(x), y)


def flat_loss(model, x, y):
    """The loss as a function of all parameters, flattened into one vector."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]

    def loss(vector):
        values, start = {}, 0
        for name, shape in zip(names, shapes):
            count = shape.numel()
            values[name] = vector[start : start + count].reshape(shape)
            start += count
        return F.cross_entropy(functional_call(model, values, (x,)), y)

    return loss


def flatten(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def direction_of(expression: str, model: nn.Module, x, y, lr: float = 1e-2, **build) -> torch.Tensor:
    """u of one step (flattened), read as (p_before − p_after)/lr."""
    opt = opcomp.build(expression, model, lr=lr, **build)
    before = flatten([p.detach().clone() for p in model.parameters()])
    opt.step(lambda: loss_of(model, x, y))
    return (before - flatten([p.detach() for p in model.parameters()])) / lr


def gradient(model, x, y) -> torch.Tensor:
    return flatten(torch.autograd.grad(loss_of(model, x, y), list(model.parameters())))


def test_hvp_equals_torch_autograd_functional_hvp():
    model, (x, y) = tiny(), batch()
    reference_model = copy.deepcopy(model)
    g = gradient(reference_model, x, y)
    params = flatten([p.detach() for p in reference_model.parameters()])
    _, expected = hvp(flat_loss(reference_model, x, y), params, g)
    torch.testing.assert_close(direction_of("hvp(g)", model, x, y), expected, rtol=1e-3, atol=1e-5)


def explicit_gauss_newton(model, x, y) -> torch.Tensor:
    """J_fᵀ H_L J_f of the mean cross-entropy, (P, P), from torch.func's jacrev and hessian."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    params = flatten([p.detach() for p in model.parameters()])

    def outputs(vector):
        values, start = {}, 0
        for name, shape in zip(names, shapes):
            values[name] = vector[start : start + shape.numel()].reshape(shape)
            start += shape.numel()
        return functional_call(model, values, (x,)).reshape(-1)

    jacobian = jacrev(outputs)(params)  # (N·C, P)
    logits = outputs(params).detach()
    loss_hessian = hessian(lambda f: F.cross_entropy(f.reshape(len(y), -1), y), logits)  # (N·C, N·C)
    return jacobian.T @ loss_hessian @ jacobian


def test_gnvp_equals_an_explicit_jacobian_times_loss_hessian_times_jacobian():
    model, (x, y) = tiny(), batch()
    reference_model = copy.deepcopy(model)
    expected = explicit_gauss_newton(reference_model, x, y) @ gradient(reference_model, x, y)
    torch.testing.assert_close(direction_of("gnvp(g)", model, x, y), expected, rtol=1e-3, atol=1e-5)


def test_gnvp_of_an_accumulated_loss_is_the_full_batch_product():
    """The closure runs the model on two micro-batches: both forwards count, not the last one."""
    model, (x, y) = tiny(), batch()
    reference_model = copy.deepcopy(model)
    expected = explicit_gauss_newton(reference_model, x, y) @ gradient(reference_model, x, y)
    opt = opcomp.build("gnvp(g)", model, lr=1.0)
    before = flatten([p.detach().clone() for p in model.parameters()])
    opt.step(lambda: (loss_of(model, x[:3], y[:3]) + loss_of(model, x[3:], y[3:])) / 2)
    moved = before - flatten([p.detach() for p in model.parameters()])
    torch.testing.assert_close(moved, expected, rtol=1e-3, atol=1e-5)


def test_gnvp_through_batchnorm_in_training_mode_uses_batch_statistics_and_updates_running_ones_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    x, y = batch()
    reference_model = copy.deepcopy(model)
    reference_model[1].track_running_stats = False  # batch statistics, nothing updated: what training sees
    reference_model[1].running_mean = reference_model[1].running_var = None
    expected = explicit_gauss_newton(reference_model, x, y) @ gradient(reference_model, x, y)
    once = copy.deepcopy(model)
    once(x)  # one training forward's update of the running statistics
    torch.testing.assert_close(direction_of("gnvp(g)", model, x, y), expected, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(model[1].running_mean, once[1].running_mean, rtol=0, atol=0)
    torch.testing.assert_close(model[1].running_var, once[1].running_var, rtol=0, atol=0)


def test_f3eo_direction_against_an_explicit_hessian():
    model, (x, y) = tiny(), batch()
    reference_model = copy.deepcopy(model)
    params = flatten([p.detach() for p in reference_model.parameters()])
    full = hessian(flat_loss(reference_model, x, y), params)
    g = gradient(reference_model, x, y)
    hg = full @ g
    expected, start = [], 0
    for p in reference_model.parameters():  # reject per parameter, as the operator is defined
        size = p.numel()
        gi, hi = g[start : start + size], hg[start : start + size]
        expected.append(gi + hi - (hi @ gi) / (gi @ gi) * gi)
        start += size
    torch.testing.assert_close(
        direction_of("g + reject(hvp(g), g)", model, x, y), torch.cat(expected), rtol=1e-3, atol=1e-5
    )


def naive_sam_gradient(model, x, y, rho: float) -> list[torch.Tensor]:
    """g_sam written out: ∇L at p + rho·g/‖g‖; parameters and buffers are put back afterwards, so
    only the first (training) forward moves running statistics."""
    params = list(model.parameters())
    g = torch.autograd.grad(loss_of(model, x, y), params)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    start = [p.detach().clone() for p in params]
    norm = torch.sqrt(sum((gi**2).sum() for gi in g))
    with torch.no_grad():
        for p, gi in zip(params, g):
            p.add_(rho * gi / norm)
    g_sam = torch.autograd.grad(loss_of(model, x, y), params)
    with torch.no_grad():
        for p, w in zip(params, start):
            p.copy_(w)
        for name, value in model.named_buffers():
            value.copy_(buffers[name])
    return list(g_sam)


def test_plain_sam_around_sgd_equals_the_two_step_formula():
    model, (x, y) = tiny(), batch()
    reference = copy.deepcopy(model)
    rho, lr = 0.1, 0.05
    opt = opcomp.build(f"sam[rho={rho}](g)", model, lr=lr)
    for _ in range(3):
        opt.step(lambda: loss_of(model, x, y))
        g_sam = naive_sam_gradient(reference, x, y, rho)
        with torch.no_grad():
            for p, gs in zip(reference.parameters(), g_sam):
                p.sub_(lr * gs)
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fs_adarmsuon_follows_the_four_steps_of_its_adr():
    """FS-AdaRMSuon's SAM (docs/probes.md): (1) moments from the raw gradient; (2) ε = ρ·(g ⊙ √v̂)/‖g ⊙ √v̂‖;
    (3) g_sam = ∇L(w + ε); (4) a = g_sam/(√v̂ + eps), update orth(a)·‖a‖/‖orth(a)‖."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.Tanh(), nn.Linear(8, 4, bias=False))
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 6, generator=generator), torch.randint(0, 4, (10,), generator=generator)
    rho, lr, b1, b2, eps = 0.05, 0.01, 0.9, 0.999, 1e-8
    opt = opcomp.build(f"sam[fisher, rho={rho}](adarmsuon)", model, lr=lr)
    reference = copy.deepcopy(model)
    m = [torch.zeros_like(p) for p in reference.parameters()]
    v = [torch.zeros_like(p) for p in reference.parameters()]
    for t in range(1, 4):
        closure = Recording(model, x, y)
        start = [p.detach().clone() for p in model.parameters()]
        opt.step(closure)
        visited = closure.visited
        params = list(reference.parameters())
        g = torch.autograd.grad(loss_of(reference, x, y), params)
        # (1) the moments read the raw gradient
        for i, gi in enumerate(g):
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
        state = next(iter(opt.state[model[0].weight].values()))
        torch.testing.assert_close(state["exp_avg"], m[0])
        torch.testing.assert_close(state["exp_avg_sq"], v[0])
        v_hat = [vi / (1 - b2**t) for vi in v]
        # (2) the probed point is w + ε
        d = [gi * vh.sqrt() for gi, vh in zip(g, v_hat)]
        norm = torch.sqrt(sum((di**2).sum() for di in d))
        epsilon = [rho * di / norm for di in d]
        assert len(visited) == 2 and all(torch.equal(a, b) for a, b in zip(visited[0], start))
        for seen, w, e in zip(visited[1], start, epsilon):
            torch.testing.assert_close(seen, w + e, rtol=1e-6, atol=1e-7)
        # (3) g_sam at that point
        with torch.no_grad():
            for p, e in zip(params, epsilon):
                p.add_(e)
        g_sam = torch.autograd.grad(loss_of(reference, x, y), params)
        with torch.no_grad():
            for p, w in zip(params, start):
                p.copy_(w)
            # (4) energy-preserving orthogonalisation of g_sam / (√v̂ + eps)
            for p, gs, vh in zip(params, g_sam, v_hat):
                a = gs / (vh.sqrt() + eps)
                o = _zeropower_via_newtonschulz(a, (3.4445, -4.7750, 2.0315), 5, 1e-7).float()
                p.sub_(lr * o * a.norm() / o.norm())
        for a, b in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class Recording:
    """A closure that remembers the parameters it was evaluated at."""

    def __init__(self, model: nn.Module, x, y) -> None:
        self.model, self.x, self.y = model, x, y
        self.visited: list[list[torch.Tensor]] = []

    def __call__(self) -> torch.Tensor:
        self.visited.append([p.detach().clone() for p in self.model.parameters()])
        return loss_of(self.model, self.x, self.y)


def least_squares(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 5, generator=generator)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0], [0.0]]) + 0.1 * torch.randn(40, 1, generator=generator)
    return x, y


def test_lgn_with_cg_lands_on_the_least_squares_optimum_in_one_step():
    x, y = least_squares()
    torch.manual_seed(1)
    model = nn.Linear(5, 1)
    opt = opcomp.build("lgn[solver=cg, steps=12, damping=0.0](g)", model, lr=1.0)
    opt.step(lambda: F.mse_loss(model(x), y))
    design = torch.cat([x, torch.ones(40, 1)], 1).double()
    optimum = torch.linalg.lstsq(design, y.double()).solution.squeeze(1)
    found = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()]).double()
    # fp32 parameters near 3 resolve about 2.4e-7: a few roundings of CG's updates are 1e-6 apart
    torch.testing.assert_close(found, optimum, rtol=4e-6, atol=1e-6)


def test_lgn_with_adam_lowers_the_quadratic_model_every_step():
    x, y = least_squares(2)
    torch.manual_seed(3)
    model = nn.Linear(5, 1)
    damping = 1e-4
    opt = opcomp.build(f"lgn[solver=adam, steps=5, damping={damping}, inner_lr=0.05](g)", model, lr=1.0)
    design = torch.cat([x, torch.ones(40, 1)], 1)
    curvature = 2 * design.T @ design / 40 + damping * torch.eye(6)  # Gauss–Newton of the mean squared error
    for _ in range(5):
        params = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
        g = 2 * design.T @ (design @ params - y.squeeze(1)) / 40
        opt.step(lambda: F.mse_loss(model(x), y))
        d = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()]) - params  # = −u at lr 1
        assert float(g @ d + 0.5 * d @ curvature @ d) < 0


def test_zeroth_order_estimate_points_along_the_gradient_on_average():
    model, (x, y) = tiny(), batch()
    start = [p.detach().clone() for p in model.parameters()]
    true = gradient(copy.deepcopy(model), x, y)
    opt = opcomp.build("zo[eps=1e-3]", model, lr=1.0)
    total = torch.zeros_like(true)
    for _ in range(1500):
        opt.step(lambda: loss_of(model, x, y))
        with torch.no_grad():
            total += flatten([w - p for w, p in zip(start, model.parameters())])
            for p, w in zip(model.parameters(), start):
                p.copy_(w)
    cosine = F.cosine_similarity(total, true, dim=0)
    assert cosine > 0.9


def separable_quadratic():
    curvatures = torch.tensor([1.0, 2.0, 4.0, 8.0])
    theta = nn.Parameter(torch.tensor([1.0, -1.0, 0.5, 2.0]))
    return theta, curvatures, lambda: 0.5 * (curvatures * theta**2).sum()


def test_zeroth_order_newton_converges_on_a_separable_quadratic():
    theta, _, loss = separable_quadratic()
    opt = opcomp.build("zo[newton, eps=0.1]", [theta], lr=1.0)
    start = loss().item()
    for _ in range(150):
        opt.step(loss)
    assert loss().item() < 1e-3 * start


def test_diag_hessian_is_exact_on_a_diagonal_quadratic():
    theta, curvatures, loss = separable_quadratic()
    opt = opcomp.build("diag_hessian[beta=0.0, eps=1e-12](g)", [theta], lr=1.0)
    opt.step(loss)  # direction g/|diag H| = θ: one Newton step to the minimum
    assert theta.detach().abs().max() < 1e-6
    estimate = opt.state[theta][next(iter(opt.state[theta]))]["hess_sq"].sqrt()
    torch.testing.assert_close(estimate, curvatures)


def test_hutchinson_estimates_the_diagonal_in_expectation_off_the_diagonal_too():
    theta = nn.Parameter(torch.tensor([1.0, -1.0, 0.5]))
    h = torch.tensor([[3.0, 1.0, -0.5], [1.0, 2.0, 0.3], [-0.5, 0.3, 1.0]])

    def loss():
        return 0.5 * theta @ h @ theta

    opt = opcomp.build("diag_hessian[beta=0.999, eps=1e-12](g)", [theta], lr=0.0)
    for _ in range(3000):
        opt.step(loss)
    second = opt.state[theta][next(iter(opt.state[theta]))]["hess_sq"] / (1 - 0.999**3000)
    expected = torch.diagonal(h) ** 2 + (h**2).sum(1) - torch.diagonal(h) ** 2  # E[(z⊙Hz)²] = Σ_j h_ij²
    torch.testing.assert_close(second, expected, rtol=0.1, atol=0.0)


@pytest.mark.parametrize("expression", ["sam(g)", "grad_at(g)", "zo", "sam[adaptive](momentum(g))"])
def test_probes_restore_parameters_and_buffers_exactly(expression):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    x, y = batch()
    plain = copy.deepcopy(model)
    loss_of(plain, x, y)  # the one training forward: running statistics move once
    opt = opcomp.build(expression, model, lr=0.0)
    opt.step(lambda: loss_of(model, x, y))
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        if expression == "zo" and "running" in name:
            # zo runs no training pass: its first probe, at p + eps·z, is the one forward that counts
            torch.testing.assert_close(a, b, rtol=0, atol=1e-3)
        else:
            assert torch.equal(a, b), name


def test_sam_with_batchnorm_equals_a_reference_computed_without_the_probe_machinery():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    reference = copy.deepcopy(model)
    x, y = batch()
    rho, lr = 0.05, 0.1
    opt = opcomp.build(f"sam_sgd[rho={rho}]", model, lr=lr)
    opt.step(lambda: loss_of(model, x, y))
    g_sam = naive_sam_gradient(reference, x, y, rho)
    with torch.no_grad():
        for p, gs in zip(reference.parameters(), g_sam):
            p.sub_(lr * gs)  # momentum's first step: the buffer is the input
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


class TestClosureProtocol:
    @pytest.mark.parametrize(
        ("expression", "needs"), [("sam_sgd", True), ("mezo", True), ("fog", False), ("adamw", False)]
    )
    def test_the_optimizer_says_whether_its_step_needs_a_closure(self, expression, needs):
        assert opcomp.build(expression, tiny()).needs_closure is needs

    def test_probes_need_a_closure(self):
        model = tiny()
        opt = opcomp.build("sam_sgd", model)
        loss_of(model, *batch()).backward()
        with pytest.raises(opcomp.OpcompError, match=r"'sam' evaluates the loss again .* opt.step\(closure\)"):
            opt.step()

    @pytest.mark.parametrize(("expression", "op"), [("f3eo", "hvp"), ("adagnoema", "lgn")])
    def test_second_order_probes_refuse_a_closure_that_calls_backward_with_the_fix(self, expression, op):
        model = tiny()
        opt = opcomp.build(expression, model)
        before = [p.detach().clone() for p in model.parameters()]

        def closure():
            loss = loss_of(model, *batch())
            loss.backward()
            return loss

        with pytest.raises(opcomp.OpcompError, match=f"'{op}' differentiates the loss again.*return the loss instead"):
            opt.step(closure)
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and not opt.state

    @staticmethod
    def lightning_style(model, opt, x, y):
        """What Lightning's automatic optimization hands to step: zero_grad, forward, backward,
        and the loss returned detached."""

        def closure():
            opt.zero_grad()
            loss = loss_of(model, x, y)
            loss.backward()
            return loss.detach().clone()

        return closure

    @staticmethod
    def plain(model, x, y):
        return lambda: loss_of(model, x, y)

    @pytest.mark.parametrize("expression", ["sam_sgd", "asam_sgd", "adamw(grad_at[rho=0.1](g))", "mezo", "awzo"])
    def test_first_order_probes_take_a_closure_that_calls_backward_and_step_the_same(self, expression):
        results = []
        for style in ("returns the loss", "calls backward"):
            model = tiny()
            opt = opcomp.build(expression, model, lr=0.05)
            losses = []
            for step in range(3):
                x, y = batch(seed=step)
                torch.manual_seed(step)  # zo draws its probes from the global generator
                backward = style == "calls backward"
                closure = self.lightning_style(model, opt, x, y) if backward else self.plain(model, x, y)
                losses.append(float(opt.step(closure)))
            results.append((losses, [p.detach().clone() for p in model.parameters()]))
        (losses, params), (their_losses, theirs) = results
        assert losses == their_losses
        assert all(torch.equal(a, b) for a, b in zip(params, theirs))
        assert any(not torch.equal(a, b) for a, b in zip(params, tiny().parameters()))  # it trained

    def test_probes_refuse_gradients_accumulated_before_the_step(self):
        model = tiny()
        opt = opcomp.build("sam_sgd", model)
        x, y = batch()
        loss_of(model, x, y).backward()  # the first micro-batch, outside the step
        before = [p.detach().clone() for p in model.parameters()]

        def closure():  # the last micro-batch: no zero_grad, its backward adds to the first's
            loss = loss_of(model, x, y)
            loss.backward()
            return loss

        with pytest.raises(opcomp.OpcompError, match="added to gradients from before the step.*accumulate inside"):
            opt.step(closure)
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    @staticmethod
    def torch_style(model, x, y):
        def closure():
            loss = loss_of(model, x, y)
            loss.backward()
            return loss

        return closure

    def test_a_torch_style_closure_accumulating_micro_batches_steps_like_torch(self):
        """Gradients from earlier micro-batches stay: the closure's backward adds the last one."""
        results = []
        for make in (lambda m: opcomp.build("adamw", m, lr=0.01), lambda m: torch.optim.AdamW(m.parameters(), lr=0.01)):
            model = tiny()
            opt = make(model)
            x, y = batch(size=8)
            loss_of(model, x[:4], y[:4]).backward()
            opt.step(self.torch_style(model, x[4:], y[4:]))
            results.append(flatten([p.detach().clone() for p in model.parameters()]))
        torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)

    @pytest.mark.parametrize(
        ("returned", "words"),
        [
            (None, "returned None"),
            ((1, 2), "returned tuple"),
            ("vector", "must be a scalar"),
            ("detached", "does not depend"),
        ],
    )
    def test_a_closure_returning_the_wrong_thing_is_named(self, returned, words):
        model = tiny()
        opt = opcomp.build("sam_sgd", model)
        x, y = batch()

        def closure():
            if returned == "vector":
                return F.cross_entropy(model(x), y, reduction="none")
            if returned == "detached":
                return loss_of(model, x, y).detach()
            return returned

        with pytest.raises(opcomp.OpcompError, match=words):
            opt.step(closure)

    @staticmethod
    def one_step(style: str):
        model = tiny()
        opt = opcomp.build("adamw", model, lr=0.01)
        x, y = batch()
        if style == "opcomp closure":
            loss = opt.step(lambda: loss_of(model, x, y))
        elif style == "torch closure":

            def closure():
                opt.zero_grad()
                loss = loss_of(model, x, y)
                loss.backward()
                return loss

            loss = opt.step(closure)
        else:
            opt.zero_grad()
            loss = loss_of(model, x, y)
            loss.backward()
            opt.step()
        return float(loss.detach()), [p.detach().clone() for p in model.parameters()]

    @pytest.mark.parametrize("style", ["torch closure", "backward then step"])
    def test_one_loop_shape_or_torchs_for_expressions_without_probes(self, style):
        (reference_loss, reference), (loss, params) = self.one_step("opcomp closure"), self.one_step(style)
        assert loss == reference_loss
        assert all(torch.equal(a, b) for a, b in zip(reference, params))

    def test_explain_states_the_cost_per_step(self):
        text = opcomp.build("fs_adarmsuon", tiny()).explain()
        assert "cost        2 forward passes, 2 backward passes per step" in text
        assert "a copy of the parameters" in text


@pytest.mark.parametrize("expression", ["adam(g) + sam(g)", "adam(g) + zo"])  # a probed gradient, a probed loss
def test_a_non_finite_probe_skips_the_whole_step_and_restores_state(expression):
    model, (x, y) = tiny(), batch()
    opt = opcomp.build(expression, model, lr=0.01)
    opt.step(lambda: loss_of(model, x, y))
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    calls = []

    def closure():  # finite at p, infinite at the probed point
        calls.append(1)
        loss = loss_of(model, x, y)
        return loss if len(calls) == 1 else loss * float("inf")

    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    after = opt.state_dict()["state"]
    for index in state:
        for key in state[index]:
            for name, tensor in state[index][key].items():
                assert torch.equal(tensor, after[index][key][name]), (index, key, name)


def test_a_step_whose_direction_is_not_finite_is_skipped_and_changes_nothing(monkeypatch):
    """Probed gradients and losses are checked as they arrive; what a formula makes of them
    (an overflow, 0/0) is checked before anything is applied."""
    from opcomp import kernels

    model, (x, y) = tiny(), batch()
    opt = opcomp.build("momentum(sam(sign(g)))", model, lr=0.01)
    opt.step(lambda: loss_of(model, x, y))
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    sign = kernels.KERNELS["sign"]
    monkeypatch.setitem(kernels.KERNELS, "sign", lambda ctx, v: [t / 0.0 for t in sign(ctx, v)])
    with pytest.warns(RuntimeWarning, match="the step itself held inf or NaN"):
        opt.step(lambda: loss_of(model, x, y))
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    after = opt.state_dict()["state"]
    assert all(
        torch.equal(tensor, after[index][key][name])
        for index in state
        for key in state[index]
        for name, tensor in state[index][key].items()
    )


def test_grad_at_is_the_gradient_at_the_shifted_point():
    model, (x, y) = tiny(), batch()
    reference = copy.deepcopy(model)
    expected = flatten(naive_sam_gradient(reference, x, y, 0.2))  # ∇L(p + 0.2·g/‖g‖)
    # lr=1 reads u = p_before − p_after without amplifying the rounding of the subtraction
    torch.testing.assert_close(direction_of("grad_at[rho=0.2](g)", model, x, y, lr=1.0), expected, rtol=1e-4, atol=1e-6)


def hessian_times(model, x, y, vector: torch.Tensor) -> torch.Tensor:
    params = flatten([p.detach() for p in model.parameters()])
    return hvp(flat_loss(model, x, y), params, vector)[1]


@pytest.mark.parametrize("expression", ["hvp(grad_at[rho=0.1](g))", "sam[rho=0.1](hvp(g))"])
def test_hessian_products_after_a_shifting_probe_use_the_hessian_at_p(expression):
    """Both are H(p)·∇L(p + 0.1·g/‖g‖): the shifted evaluation must leave the graph at p usable."""
    model, (x, y) = tiny(), batch()
    reference = copy.deepcopy(model)
    shifted = flatten(naive_sam_gradient(copy.deepcopy(model), x, y, 0.1))
    expected = hessian_times(reference, x, y, shifted)
    torch.testing.assert_close(direction_of(expression, model, x, y, lr=1.0), expected, rtol=1e-4, atol=1e-6)


def test_a_hessian_product_of_a_zeroth_order_estimate_is_h_times_that_estimate():
    model, (x, y) = tiny(), batch()
    twin = copy.deepcopy(model)
    estimate = direction_of("zo", twin, x, y, lr=1.0)  # the same node key: the same seeded noise
    expected = hessian_times(copy.deepcopy(model), x, y, estimate)
    torch.testing.assert_close(direction_of("hvp(zo)", model, x, y, lr=1.0), expected, rtol=1e-4, atol=1e-6)


def test_f3eo_inside_sam_follows_both_formulas():
    """sam(adamw(g + reject(hvp(g), g))), first step: x = g_s + reject(H g_s, g_s) per parameter with
    g_s = ∇L(p + ε) and H at p; Adam's moments read the raw g, so u = x/(|g| + eps) + wd·p."""
    model, (x, y) = tiny(), batch()
    reference = copy.deepcopy(model)
    params = [p.detach().clone() for p in reference.parameters()]
    raw = torch.autograd.grad(loss_of(reference, x, y), list(reference.parameters()))
    probed = naive_sam_gradient(copy.deepcopy(model), x, y, 0.05)
    products = hessian_times(reference, x, y, flatten(probed)).split([p.numel() for p in params])
    expected = []
    for p, g, gs, hg in zip(params, raw, probed, products):
        gs, hg = gs.reshape(-1), hg.reshape(-1)
        combined = gs + hg - (hg @ gs) / (gs @ gs) * gs
        expected.append(combined / (g.reshape(-1).abs() + 1e-8) + 0.01 * p.reshape(-1))
    found = direction_of("sam(adamw(g + reject(hvp(g), g)))", model, x, y, lr=1.0)
    torch.testing.assert_close(found, torch.cat(expected), rtol=1e-4, atol=1e-5)


def test_hutchinson_inside_sam_is_exact_on_a_diagonal_quadratic():
    """L = ½ Σ h θ²: z ⊙ Hz = h for every Rademacher z, so u = g_sam/(|h| + eps) with
    g_sam = h ⊙ (θ + ε), ε = rho·g/‖g‖."""
    theta, curvatures, loss = separable_quadratic()
    start = theta.detach().clone()
    g = curvatures * start
    expected = curvatures * (start + 0.05 * g / g.norm()) / (curvatures + 1e-12)
    opt = opcomp.build("sam(diag_hessian[beta=0.0, eps=1e-12](g))", [theta], lr=1.0)
    opt.step(loss)
    torch.testing.assert_close(start - theta.detach(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("expression", "passes"), [("mezo", 2), ("zo[relative]", 2), ("awzo", 3)])
def test_zeroth_order_runs_only_forward_passes_without_a_graph(expression, passes):
    model, (x, y) = tiny(), batch()
    with torch.no_grad():
        at_p = float(loss_of(model, x, y))
    grad_modes = []

    def closure():
        grad_modes.append(torch.is_grad_enabled())
        with torch.no_grad():  # an inference-only closure is accepted
            return loss_of(model, x, y)

    opt = opcomp.build(expression, model, lr=1e-3)
    reported = opt.step(closure)
    assert grad_modes == [False] * passes
    assert all(p.grad is None for p in model.parameters())
    # the loss at p (awzo evaluates it), or the mean of L(p ± Δ), which is L(p) + O(Δ²)
    assert abs(float(reported) - at_p) < 1e-4


def test_awzo_measures_curvature_rather_than_its_rounding_floor():
    """At the preset's eps the three-point curvature mostly rises above the loss's rounding; at
    1e-3 (the operator's MeZO default) every probe on this task is floored, the scale a constant."""
    from opcomp.bench.awzo_floor import floored_share
    from opcomp.bench.sweep import train_steps
    from opcomp.comparison.tasks import digits

    task = digits()
    _, preset = train_steps(task, "awzo", opcomp.presets().note("awzo").lr, 20)
    _, tiny_eps = train_steps(task, "zo[relative, newton, eps=0.001]", 0.03, 20)
    assert floored_share(preset, 20) <= 0.25
    assert floored_share(tiny_eps, 20) == 1.0


def test_a_probed_numerator_with_no_second_moment_leaves_the_weight_alone():
    """L = (w·u − 1)² at w = 1, u = 0: ∂L/∂w = 0 exactly, so v̂_w = 0, while at p + ε it is not.
    g_sam/(√v̂ + eps) would move w by lr·g_sam/eps; with no scale to normalise by, it stays."""
    w, u = nn.Parameter(torch.ones(1)), nn.Parameter(torch.zeros(1))
    opt = opcomp.build("sam[fisher, rho=0.1](adam(g))", [w, u], lr=0.01)
    opt.step(lambda: ((w * u - 1) ** 2).sum())
    assert torch.equal(w.detach(), torch.ones(1))
    # u: the ascent ε = rho·sign(g_u) = −0.1, g_sam_u = 2(w(u + ε) − 1)·w = −2.2, v̂_u = g_u² = 4
    torch.testing.assert_close(u.detach(), torch.tensor([0.01 * 2.2 / (2.0 + 1e-8)]))
