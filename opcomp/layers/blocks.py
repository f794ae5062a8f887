"""Products with a factor (or its inverse, or its eigenbasis) in any :class:`FactorForm`: a
matrix, a diagonal, or block-diagonal blocks.

A blocked factor's side is padded to whole blocks: values are padded with zeros on the way in
and cut on the way out. The padding of the last block never mixes with its real part: an
inverse of a damped padded block is block-diagonal, and an eigenbasis of a padded block is the
identity on the padding (:func:`~opcomp.kernels.decompositions` decomposes the real part alone).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from opcomp.layers.shapes import FactorForm


def in_blocks(values: Tensor, form: FactorForm, dim: int = -1) -> Tensor:
    """``values`` with dimension ``dim`` (the factor's side) zero-padded to whole blocks and split
    into (count, block)."""
    padding = [0, 0] * (-dim - 1) + [0, form.padded - form.side]
    return F.pad(values, padding).unflatten(dim, (form.count, form.block))


def rows_times(rows: Tensor, q: Tensor, form: FactorForm, transposed: bool = False) -> Tensor:
    """rows Q (or rows Qᵀ): rows (…, [groups,] side) by a factor of ``form`` per group, q
    (side, side), ([groups,] count, block, block) or a diagonal ([groups,] side)."""
    if form.diagonal:
        return rows * q
    matrix = q.mT if transposed else q
    if form.dense:
        return rows @ matrix if q.ndim == 2 else torch.einsum("...ki,kij->...kj", rows, matrix)
    padded = in_blocks(rows, form)
    inner = q.ndim - 1  # [groups,] count, block: the trailing dimensions the blocks act along
    flat = padded.reshape(-1, *padded.shape[padded.ndim - inner :])  # (rows, [groups,] count, block)
    products = flat.movedim(0, -2) @ matrix  # ([groups,] count, rows, block): one batched product
    return products.movedim(-2, 0).reshape(padded.shape).flatten(-2)[..., : form.side]


def left_times(q: Tensor, x: Tensor, form: FactorForm, transposed: bool = False) -> Tensor:
    """Q X (or Qᵀ X) for X ([groups,] out, in) and Q of ``form`` on the out side."""
    if form.diagonal:
        return q.unsqueeze(-1) * x
    if form.dense:
        return (q.mT if transposed else q) @ x
    return rows_times(x.mT.movedim(-2, 0), q, form, not transposed).movedim(0, -2).mT


def right_times(x: Tensor, q: Tensor, form: FactorForm, transposed: bool = False) -> Tensor:
    """X Q (or X Qᵀ) for X ([groups,] out, in) and Q of ``form`` on the in side."""
    if form.diagonal:
        return x * q.unsqueeze(-2)
    if form.dense:
        return x @ (q.mT if transposed else q)
    return rows_times(x.movedim(-2, 0), q, form, transposed).movedim(0, -2)


def gram_layout(rows: Tensor, form: FactorForm) -> Tensor:
    """Rows (n, [groups,] side) laid out for one batched gram per block: ([groups,] [count,] n,
    block), the last block zero-padded; a whole factor's rows as (n, side) or (groups, n, side)."""
    if form.blocked:
        rows = in_blocks(rows, form)
    return rows.movedim(0, -2) if rows.ndim > 2 else rows


def trace(factor: Tensor, form: FactorForm) -> Tensor:
    """The trace of a factor of ``form``, per group (padding holds zeros)."""
    if form.diagonal:
        return factor.sum(-1)
    diagonal = factor.diagonal(dim1=-2, dim2=-1)
    return diagonal.sum((-2, -1)) if form.blocked else diagonal.sum(-1)


def pieces(factor: Tensor, form: FactorForm) -> list[Tensor]:
    """What decomposing a factor takes: the matrix; or its blocks, the last block's real part
    apart when it is padded (so no eigenvector mixes the padding in)."""
    if not form.blocked or form.last == form.block:
        return [factor]
    return [factor[..., :-1, :, :], factor[..., -1, : form.last, : form.last]]


def eigen_assembled(parts: list[tuple[Tensor, Tensor]], form: FactorForm) -> tuple[Tensor, Tensor]:
    """Eigenvalues ([groups,] side) and eigenbasis in ``form`` from the decomposition of each of
    :func:`pieces`: a padded last block's basis is its real part's, the identity on the padding."""
    if not form.blocked:
        return parts[0]
    if len(parts) == 1:
        values, vectors = parts[0]
        return values.flatten(-2), vectors
    (values, vectors), (last_values, last_vectors) = parts
    last = torch.eye(form.block, dtype=vectors.dtype, device=vectors.device).expand(*vectors.shape[:-3], -1, -1)
    last = last.clone()
    last[..., : form.last, : form.last] = last_vectors
    return torch.cat([values.flatten(-2), last_values], -1), torch.cat([vectors, last.unsqueeze(-3)], -3)


def side_grams(matrices: Tensor, left: FactorForm, right: FactorForm) -> tuple[Tensor, Tensor]:
    """G Gᵀ and Gᵀ G of a batch of matrices (…, m, n), each kept in its form: whole, or the
    diagonal blocks of ``left`` along the rows, of ``right`` along the columns (padding zero)."""
    if left.blocked:
        rows = in_blocks(matrices, left, dim=-2)  # (…, count, block, n)
        left_gram = rows @ rows.mT  # (…, count, block, block)
    else:
        left_gram = matrices @ matrices.mT
    if right.blocked:
        columns = in_blocks(matrices, right).movedim(-2, -3)  # (…, count, m, block)
        right_gram = columns.mT @ columns
    else:
        right_gram = matrices.mT @ matrices
    return left_gram, right_gram
