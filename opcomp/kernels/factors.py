"""Batch statistics of a layer from captured entries: the rows whose outer products make A and G.

Every supported layer is brought to one form, ``Rows``: ``a`` rows for the input side (the bias
as an appended 1 when the bias is folded in) and ``d`` rows for the output side, each output
gradient scaled to a per-example gradient (× batch size for a mean-reduced loss). Then

    A = aᵀa / a_count,   G = dᵀd / d_count.

- Linear over any leading dimensions ("expand"): every position is a row; a_count = positions,
  d_count = examples, so G sums over the positions of an example and averages over examples.
- Conv2d ("reduce"): an example's unfolded patches are averaged and its output gradients summed
  over positions, one row per example. Exact when the output gradients are shared over positions
  (average pooling) or the patches are.
- Embedding: the input factor is diagonal, token counts / positions; ``a`` holds the token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from opcomp.capture import Entry
from opcomp.errors import OpcompError

Reduction = Literal["mean", "sum"]


@dataclass
class Rows:
    a: Tensor  # (rows, in) float, or (rows,) token ids for an Embedding
    d: Tensor  # (rows, out) per-example output gradients
    a_count: float
    d_count: float
    vocabulary: int = 0  # Embedding only: the number of tokens

    def A(self) -> Tensor:
        return self.a.T @ self.a / self.a_count

    def A_diagonal(self) -> Tensor:
        if self.vocabulary:
            return torch.bincount(self.a, minlength=self.vocabulary).float() / self.a_count
        return self.a.square().sum(0) / self.a_count

    def G(self) -> Tensor:
        return self.d.T @ self.d / self.d_count

    def G_diagonal(self) -> Tensor:
        return self.d.square().sum(0) / self.d_count

    def eigen_scale(self, q_g: Tensor, q_a: Tensor | None) -> Tensor:
        """E over examples of (Q_Gᵀ ∇W_n Q_A)², (out, in): the EKFAC eigenvalue correction."""
        d = (self.d @ q_g).square()
        if self.vocabulary:  # Q_A = I: each row adds its squared projection to its token's column
            scale = torch.zeros(self.vocabulary, d.shape[1], dtype=d.dtype, device=d.device)
            return scale.index_add_(0, self.a, d).T / self.d_count
        return d.T @ (self.a @ q_a).square() / self.d_count


def check_supported(module: nn.Module, name: str) -> None:
    """Refuse, at build time, layer configurations the statistics do not cover."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise OpcompError(f"layer '{name}' is a grouped Conv2d (groups={module.groups}); KFAC supports groups=1")
        if module.padding_mode != "zeros":
            raise OpcompError(f"layer '{name}' pads with '{module.padding_mode}'; KFAC supports padding_mode='zeros'")
        if module.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size)):
            raise OpcompError(
                f"layer '{name}' uses padding='same' with an even kernel, which pads unevenly; "
                "KFAC supports symmetric padding — give the padding as numbers"
            )


def rows(module: nn.Module, entries: list[Entry], reduction: Reduction, with_bias: bool, sampled: bool) -> Rows:
    """The rows of all captured micro-batches of ``module``, in fp32.

    Sampled (Monte Carlo) gradients are per-example already: they start from ∂ℓ_n/∂f_n, not from
    the batch loss, so only the user's gradients are rescaled by the reduction.
    """
    parts = [
        _rows(module, e.input, e.sampled, "sum", with_bias)
        if sampled
        else _rows(module, e.input, e.grad, reduction, with_bias)
        for e in entries
    ]
    if len(parts) == 1:
        return parts[0]
    a = torch.cat([p.a for p in parts])
    d = torch.cat([p.d for p in parts])
    return Rows(a, d, sum(p.a_count for p in parts), sum(p.d_count for p in parts), parts[0].vocabulary)


def _per_example(grad: Tensor, examples: int, reduction: Reduction) -> Tensor:
    grad = grad.float()
    return grad * examples if reduction == "mean" else grad


def _rows(module: nn.Module, inputs: Tensor, grad: Tensor, reduction: Reduction, with_bias: bool) -> Rows:
    examples = inputs.shape[0]
    if isinstance(module, nn.Embedding):
        d = _per_example(grad, examples, reduction).reshape(-1, module.embedding_dim)
        return Rows(inputs.reshape(-1), d, d.shape[0], examples, vocabulary=module.num_embeddings)
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(
            inputs.float(), module.kernel_size, dilation=module.dilation, padding=_padding(module), stride=module.stride
        ).mean(dim=2)
        a = _with_ones(patches) if with_bias else patches
        d = _per_example(grad, examples, reduction).flatten(2).sum(dim=2)
        return Rows(a, d, examples, examples)
    a = inputs.float().reshape(-1, inputs.shape[-1])
    a = _with_ones(a) if with_bias else a
    d = _per_example(grad, examples, reduction).reshape(-1, grad.shape[-1])
    return Rows(a, d, a.shape[0], examples)


def _with_ones(a: Tensor) -> Tensor:
    return torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], dim=1)


def _padding(module: nn.Conv2d):
    if module.padding == "valid":
        return 0
    if module.padding == "same":  # torch allows it with stride 1 only; d·(k−1) is even (checked at build)
        return tuple(d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size))
    return module.padding
