"""Block-KFAC: factors kept as diagonal blocks (``kfac[block=k]``, ``ekfac[block=k]``, and the size
budget ``max_dim``), against block-diagonal A and G built in the test from the layer's inputs and
torch.func's per-example gradients, and the closed forms of KFAC's update with them."""

from __future__ import annotations

import warnings

import pytest
import torch
from fisher import empirical_fisher, node_state, per_example_gradients
from torch import nn
from torch.nn import functional as F

import opcomp

DAMPING = 0.01


def block_diagonal(matrix: torch.Tensor, block: int) -> torch.Tensor:
    """``matrix`` (…, d, d) with everything outside the diagonal blocks of ``block`` set to zero."""
    index = torch.arange(matrix.shape[-1]) // block
    return matrix * (index.unsqueeze(0) == index.unsqueeze(1))


def as_stored(matrix: torch.Tensor, block: int) -> torch.Tensor:
    """The diagonal blocks of ``matrix`` (d, d) as a (count, block, block) batch, the last zero-padded."""
    count = -(-matrix.shape[-1] // block)
    padded = F.pad(matrix, (0, count * block - matrix.shape[-1]) * 2)
    return torch.stack([padded[i * block : (i + 1) * block, i * block : (i + 1) * block] for i in range(count)])


def mlp() -> nn.Module:
    """Linear(4 → 7), Linear(7 → 5): with biases, A is 5 × 5 and 8 × 8, G 7 × 7 and 5 × 5 — with
    blocks of 3 every last block is a part (2, 1, 2, 2 of 3)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 5)).double()


def batch(size: int = 32, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 4, generator=generator, dtype=torch.float64), torch.randint(
        0, 5, (size,), generator=generator
    )


def reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, tuple]:
    """Per layer: A = E[[a, 1][a, 1]ᵀ] from the layer's inputs, the per-example gradients
    (N, out, in + 1) from torch.func, G = E[δ δᵀ] from the per-example bias gradients (δ_n = ∇b_n),
    and X = [∇W | ∇b] of the whole batch."""
    grads = per_example_gradients(model, lambda out, target: F.cross_entropy(out, target), x, y)
    inputs = {"0": x, "2": torch.tanh(model[0](x)).detach()}
    layers = {}
    for name, a in inputs.items():
        a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
        per_example = torch.cat([grads[f"{name}.weight"], grads[f"{name}.bias"].unsqueeze(2)], 2)
        layers[name] = (a.T @ a / len(a), per_example, empirical_fisher(grads[f"{name}.bias"]), per_example.mean(0))
    return layers


def stepped(expression: str, x: torch.Tensor, y: torch.Tensor) -> tuple[nn.Module, opcomp.Optimizer, dict]:
    """One step of lr 1 from :func:`mlp`: the model, the optimizer and each layer's update (out, in + 1)."""
    model = mlp()
    opt = opcomp.build(expression, model, lr=1.0)
    before = {name: torch.cat([model[i].weight, model[i].bias.unsqueeze(1)], 1).detach() for name, i in LAYERS}
    F.cross_entropy(model(x), y).backward()
    opt.step()
    after = {name: torch.cat([model[i].weight, model[i].bias.unsqueeze(1)], 1).detach() for name, i in LAYERS}
    return model, opt, {name: before[name] - after[name] for name in before}


LAYERS = (("0", 0), ("2", 2))


def test_kfac_in_blocks_stores_the_diagonal_blocks_and_preconditions_with_their_inverses():
    """G_bd⁻¹ X A_bd⁻¹ with Martens & Grosse's π split (traces of the block-diagonal factors, which
    are the whole factors' traces), the blocks of A and G equal to the reference's."""
    x, y = batch()
    model, opt, moved = stepped(f"kfac[damping={DAMPING}, block=3](g)", x, y)
    for (name, index), (a, _, g, gradient) in zip(LAYERS, reference(mlp(), x, y).values()):
        state = node_state(opt, model[index].weight, "kfac")
        assert state["A"].shape == (-(-a.shape[0] // 3), 3, 3)
        torch.testing.assert_close(state["A"], as_stored(a, 3))
        torch.testing.assert_close(state["G"], as_stored(g, 3))
        a_bd, g_bd = block_diagonal(a, 3), block_diagonal(g, 3)
        pi = ((a.trace() / len(a)) / (g.trace() / len(g))).sqrt()
        lambda_a, lambda_g = pi * DAMPING**0.5, DAMPING**0.5 / pi
        expected = torch.linalg.solve(g_bd + lambda_g * torch.eye(len(g)), gradient) @ torch.linalg.inv(
            a_bd + lambda_a * torch.eye(len(a))
        )
        torch.testing.assert_close(moved[name], expected)


def test_exact_damping_in_blocks_solves_with_the_kronecker_product_of_the_blocks():
    """(G_bd ⊗ A_bd + λI)⁻¹ vec X, the Kronecker product formed in full."""
    x, y = batch()
    _, _, moved = stepped(f"kfac[damping={DAMPING}, damping_mode=exact, block=3](g)", x, y)
    for name, (a, _, g, gradient) in reference(mlp(), x, y).items():
        fisher = torch.kron(block_diagonal(g, 3), block_diagonal(a, 3))
        solved = torch.linalg.solve(fisher + DAMPING * torch.eye(len(fisher)), gradient.flatten())
        torch.testing.assert_close(moved[name], solved.reshape(gradient.shape))


def test_ekfac_in_blocks_refits_the_eigenvalues_in_the_block_diagonal_eigenbasis():
    """Q_G ((Q_Gᵀ X Q_A) ⊘ (s + λ)) Q_Aᵀ, Q the eigenvectors of the block-diagonal factors (eigh of
    the whole matrices: the result does not depend on their order or signs), s = E[(Q_Gᵀ ∇W_n Q_A)²]."""
    x, y = batch()
    _, _, moved = stepped(f"ekfac[damping={DAMPING}, block=3](g)", x, y)
    for name, (a, per_example, g, gradient) in reference(mlp(), x, y).items():
        q_a, q_g = torch.linalg.eigh(block_diagonal(a, 3))[1], torch.linalg.eigh(block_diagonal(g, 3))[1]
        scale = (q_g.T @ per_example @ q_a).square().mean(0)
        expected = q_g @ ((q_g.T @ gradient @ q_a) / (scale + DAMPING)) @ q_a.T
        torch.testing.assert_close(moved[name], expected)


@pytest.mark.parametrize("operator", ["kfac", "ekfac", "kfac[damping_mode=exact]"])
def test_blocks_as_long_as_every_factor_are_kfac_bit_for_bit(operator):
    """block ≥ every side keeps every factor whole: the same bits as without blocks, over 3 steps."""
    x, y = batch()
    runs = []
    for block in ("", ", block=8"):
        model = mlp()
        name, _, rest = operator.partition("[")
        options = rest.rstrip("]")
        written = f"{name}[damping={DAMPING}{', ' + options if options else ''}{block}](g)"
        opt = opcomp.build(written, model, lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_blocks_of_one_are_diagonal_kfacs_factors():
    """block = 1 keeps each factor's diagonal: diag_kfac's A and G, the same bits."""
    x, y = batch()
    factors = []
    for expression, names in (("kfac[block=1](g)", ("A", "G")), ("diag_kfac(g)", ("A_diag", "G_diag"))):
        model = mlp()
        opt = opcomp.build(expression, model, lr=0.1)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        state = node_state(opt, model[2].weight, expression.split("[")[0].split("(")[0])
        factors.append([state[n] for n in names])
    assert factors[0][0].shape == (8,)
    assert all(torch.equal(a, b) for a, b in zip(*factors))


def test_factors_over_the_budget_are_kept_as_blocks_and_the_build_says_so():
    """max_dim = 6: Linear(7 → 5)'s A (8 wide) and Linear(4 → 7)'s G (7) are kept as blocks of 6
    (6 and a part), the others whole; the build names the factors, the blocks, and the memory they
    take against the whole factors'."""
    x, y = batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, opt, moved = stepped(f"kfac[damping={DAMPING}, max_dim=6](g)", x, y)
    said = [str(w.message) for w in caught if issubclass(w.category, opcomp.OpcompWarning)]
    assert any(
        "keeps 2 factors above max_dim=6 as diagonal blocks of 6 × 6" in m
        and "0 G (7: 2 blocks of 6), 2 A (8: 2 blocks of 6)" in m
        and "(576 B in fp32; whole, they would take 452 B)" in m
        and "kfac[block=...]" in m
        for m in said
    ), said
    a, _, g, gradient = reference(mlp(), x, y)["2"]
    state = node_state(opt, model[2].weight, "kfac")
    torch.testing.assert_close(state["A"], as_stored(a, 6))
    torch.testing.assert_close(state["G"], g)  # 5 × 5: within the budget
    pi = ((a.trace() / 8) / (g.trace() / 5)).sqrt()
    a_bd = block_diagonal(a, 6) + pi * DAMPING**0.5 * torch.eye(8)
    expected = torch.linalg.solve(g + DAMPING**0.5 / pi * torch.eye(5), gradient) @ torch.linalg.inv(a_bd)
    torch.testing.assert_close(moved["2"], expected)


class Shapes(nn.Module):
    """The layer shapes users have, each with a factor over the blocks: a strided Conv2d (A 28 wide),
    a grouped Conv2d (19 per group), an Embedding (G 6 wide; A diagonal) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.grouped = nn.Conv2d(4, 6, 3, groups=2)
        self.embed = nn.Embedding(11, 6)
        self.head = nn.Linear(6 + 6, 3)

    def forward(self, inputs):
        images, ids = inputs
        features = torch.tanh(self.grouped(torch.tanh(self.conv(images)))).mean((2, 3))
        return self.head(torch.cat([features, torch.tanh(self.embed(ids)).mean(1)], 1))


@pytest.mark.parametrize("operator", ["kfac", "ekfac"])
def test_blocks_on_convolutions_and_embeddings_are_the_whole_factors_blocks(operator):
    """The blocks of A and G of every layer kind equal the diagonal blocks of the whole factors
    kfac keeps (those are tested against curvlinops and per-example gradients elsewhere), per group
    for the grouped conv; kfac's update is G_bd⁻¹ X A_bd⁻¹ with them."""
    generator = torch.Generator().manual_seed(0)
    inputs = (torch.randn(16, 3, 9, 9, generator=generator), torch.randint(0, 11, (16, 5), generator=generator))
    y = torch.randint(0, 3, (16,), generator=generator)
    states, moves = [], []
    for block in ("", ", block=4"):
        torch.manual_seed(0)
        model = Shapes().double()
        opt = opcomp.build(f"{operator}[damping={DAMPING}{block}](g)", model, lr=1.0)
        before = [p.detach().clone() for p in model.parameters()]
        F.cross_entropy(model((inputs[0].double(), inputs[1])), y).backward()
        opt.step()
        states.append({name: node_state(opt, getattr(model, name).weight, operator) for name in SHAPE_LAYERS})
        moves.append([b - p.detach() for b, p in zip(before, model.parameters())])
    whole, blocked = states
    for name in SHAPE_LAYERS:
        for factor in ("A", "G"):
            full, kept = whole[name][factor], blocked[name][factor]
            if full.ndim == 1 or full.shape[-1] <= 4:  # a diagonal (the Embedding's A), or within one block
                torch.testing.assert_close(kept, full)
                continue
            stored = torch.stack([as_stored(m, 4) for m in full]) if full.ndim == 3 else as_stored(full, 4)
            torch.testing.assert_close(kept, stored)
    if operator == "kfac":
        for name, (weight, bias) in {"conv": (0, 1), "head": (5, 6)}.items():
            a, g = whole[name]["A"], whole[name]["G"]
            x_whole = torch.cat([moves[0][weight].flatten(1), moves[0][bias].unsqueeze(1)], 1)
            g_damped, a_damped = damped(g, a)
            gradient = g_damped @ x_whole @ a_damped  # the step without blocks undone: X
            g_bd, a_bd = damped(block_diagonal(g, 4), block_diagonal(a, 4))  # the same traces
            expected = torch.linalg.solve(g_bd, gradient) @ torch.linalg.inv(a_bd)
            moved = torch.cat([moves[1][weight].flatten(1), moves[1][bias].unsqueeze(1)], 1)
            torch.testing.assert_close(moved, expected)


SHAPE_LAYERS = ("conv", "grouped", "embed", "head")


def damped(g: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """G + λ_G I and A + λ_A I with Martens & Grosse's π split."""
    pi = ((a.trace() / len(a)) / (g.trace() / len(g))).sqrt()
    return g + DAMPING**0.5 / pi * torch.eye(len(g), dtype=g.dtype), a + pi * DAMPING**0.5 * torch.eye(
        len(a), dtype=a.dtype
    )


def test_a_resumed_optimizer_with_blocks_continues_bit_for_bit():
    """ekfac and kfac in blocks: state_dict into a rebuilt optimizer, then the same bits as never stopping."""
    x, y = batch()
    expression = "ekfac[block=3, invert_every=2](g) + kfac[block=2, invert_every=2](g)"
    runs = []
    for resume in (False, True):
        model = mlp()
        opt = opcomp.build(expression, model, lr=0.1)
        for step in range(5):
            if resume and step == 3:
                saved = opt.state_dict()
                opt = opcomp.build(expression, model, lr=0.1)
                opt.load_state_dict(saved)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
