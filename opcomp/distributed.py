"""Data-parallel training: every rank computes the step one process would on the global batch.

Under ``DistributedDataParallel`` the gradients ``backward()`` leaves are already averaged over the
ranks; what opcomp computes itself is not. So opcomp reduces, over the data-parallel group, exactly
what it adds: layer statistics (KFAC's factors, their diagonals, EKFAC's correction; weighted by
each rank's count of rows or examples, so uneven batches still give the global batch's factors),
the gradients of its own backward passes (the closure's first evaluation, SAM's and ``grad_at``'s
shifted points, averaged as DDP averages), Hessian and Gauss–Newton products, and the losses that
zeroth-order estimates difference. Noise is seeded from the node and the step, so it is the same
on every rank. Every reduction is one ``all_reduce`` per device and dtype over a flat buffer.

Under FSDP2 (parameters are DTensor shards) the group is the mesh's, the training pass is a real
``backward()`` (FSDP2 reduce-scatters in its hooks), and layer kernels see whole matrices: their
inputs are all-gathered and their directions cut back to each rank's shard.

What opcomp cannot do exactly is refused when the optimizer is built (:func:`check`): probes and
``clip_global`` on FSDP2's shards, and layer statistics or probes under an initialized process
group whose data-parallel group opcomp was not told.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from opcomp.errors import OpcompError

Setting = Literal["auto", "local"] | Any
"""``data_parallel=``: "auto" (a DDP-wrapped model's group), "local" (each rank on its own), a
process group, or a :class:`DataParallel` already resolved."""

FIX = (
    "build with the DistributedDataParallel-wrapped model, pass data_parallel=<its process group> "
    "(torch.distributed.group.WORLD for all ranks), or data_parallel='local' for rank-local statistics"
)


@dataclass(frozen=True, eq=False)
class DataParallel:
    """The data-parallel group over which opcomp reduces what it computes itself."""

    group: Any  # a ProcessGroup; None is the default group
    size: int
    device: torch.device  # where scalars and counts travel (NCCL reduces only GPU tensors)
    # what it did: "bytes" and "reductions" it all-reduced; decomposition cost (Σ d³) it assigned,
    # "most work" on one rank and "mean work" per rank, whose ratio is the split's balance
    tally: Counter = field(default_factory=Counter)

    def sum(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Element-wise sums over the ranks: one all_reduce per (device, dtype) of a flat buffer."""
        out: list = [None] * len(tensors)
        by_kind: dict[tuple, list[int]] = defaultdict(list)
        for index, tensor in enumerate(tensors):
            by_kind[(tensor.device, tensor.dtype)].append(index)
        for indices in by_kind.values():
            flat = torch.cat([tensors[i].reshape(-1) for i in indices])
            dist.all_reduce(flat, group=self.group)
            self.tally.update(bytes=flat.numel() * flat.element_size(), reductions=1)
            for i, part in zip(indices, flat.split([tensors[i].numel() for i in indices])):
                out[i] = part.view(tensors[i].shape)
        return out

    def mean(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The ranks' average, as DDP averages gradients."""
        return [total.div_(self.size) for total in self.sum(tensors)]

    def mean_gradients(self, grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> list[Tensor | None]:
        """Gradients averaged over the ranks, a missing one as zeros; None only where no rank has one."""
        present = torch.tensor([g is not None for g in grads], dtype=torch.float64, device=self.device)
        filled = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        *averaged, reached = self.sum([*filled, present])
        return [g.div_(self.size) if r else None for g, r in zip(averaged, reached.tolist())]

    def mean_value(self, value: float) -> float:
        """A scalar (a probed loss) averaged over the ranks."""
        return float(self.mean([torch.tensor([value], dtype=torch.float64, device=self.device)])[0])

    def owners(self, costs: Sequence[float]) -> list[int]:
        """The rank that computes each piece of work: longest first, each to the least loaded rank
        (LPT). Every rank derives the same assignment from the same costs, with no communication."""
        loads = [0.0] * self.size
        owner = [0] * len(costs)
        for index in sorted(range(len(costs)), key=lambda i: -costs[i]):
            rank = min(range(self.size), key=loads.__getitem__)
            owner[index] = rank
            loads[rank] += costs[index]
        self.tally.update({"most work": max(loads), "mean work": sum(loads) / self.size})
        return owner

    def by_owner(
        self,
        costs: Sequence[float],
        compute: Callable[[list[int]], list[tuple]],
        layout: Sequence[Sequence[tuple]],
        like: Tensor,
    ) -> list[tuple[Tensor, ...]]:
        """Pieces of work, each computed by its owner alone (``compute(indices)`` gives the results of
        those pieces, a tuple each, shaped as ``layout`` says) and handed to every rank by one sum to
        which the others add zeros: the work splits, and every rank holds the owner's bits."""
        mine = [i for i, owner in enumerate(self.owners(costs)) if owner == self.rank]
        computed = dict(zip(mine, compute(mine))) if mine else {}
        results = [
            computed[i][k] if i in computed else like.new_zeros(shape)
            for i, parts in enumerate(layout)
            for k, shape in enumerate(parts)
        ]
        flat = iter(self.sum(results))
        return [tuple(next(flat) for _ in parts) for parts in layout]

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def pooled(self, values: Sequence[Tensor], counts: Sequence[int]) -> tuple[list[Tensor], list[float]]:
        """Σ_r n_r·v_r / Σ_r n_r per value: each rank's mean over its n_r rows, pooled into the mean
        over every rank's rows; and the pooled counts Σ_r n_r (0: no rank had any)."""
        weighted = [v * n for v, n in zip(values, counts)]
        *totals, pooled_counts = self.sum([*weighted, torch.tensor(counts, dtype=torch.float64, device=self.device)])
        counts_out = pooled_counts.tolist()
        return [t / n if n else t for t, n in zip(totals, counts_out)], counts_out


def resolve(model: nn.Module | None, setting: Setting = "auto") -> tuple[nn.Module | None, DataParallel | None]:
    """The model without its DDP wrapper (names and hooks are the module's own) and the group to
    reduce over: None when training runs in one process or the user asked for rank-local steps."""
    if isinstance(setting, DataParallel):
        return _unwrapped(model), setting
    wrapper = isinstance(model, nn.parallel.DistributedDataParallel)
    shard = next((p for p in model.parameters() if is_shard(p)), None) if model is not None else None
    if isinstance(setting, str):
        if setting not in ("auto", "local"):
            raise OpcompError(
                f"data_parallel must be 'auto', 'local' or a torch.distributed process group, got {setting!r}"
            )
        if setting == "local" or not (wrapper or shard is not None):
            return _unwrapped(model), None
        group = model.process_group if wrapper else _mesh_group(shard)
    else:
        if not (dist.is_available() and dist.is_initialized()):
            raise OpcompError("data_parallel= names a process group, but torch.distributed is not initialized")
        group = setting
    size = dist.get_world_size(group)
    inner = _unwrapped(model)
    first = next(inner.parameters(), None) if inner is not None else None
    device = first.device if first is not None else torch.device("cpu")
    return inner, DataParallel(group, size, device) if size > 1 else None


def _mesh_group(shard: Tensor):
    """The data-parallel group of FSDP2's parameters: their one-dimensional mesh's."""
    mesh = shard.device_mesh
    if mesh.ndim != 1:
        raise OpcompError(
            f"the parameters are sharded over a {mesh.ndim}-dimensional device mesh (HSDP or tensor parallelism); "
            "opcomp supports FSDP2 over one dimension: pass data_parallel=<the data-parallel group>"
        )
    return mesh.get_group()


def _unwrapped(model: nn.Module | None) -> nn.Module | None:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def check(
    params: Sequence[Tensor],
    parallel: DataParallel | None,
    setting: Setting,
    *,
    statistics: bool,
    nodes: Sequence,
) -> None:
    """Refuse, at build time, what would silently run rank-local or on shards: ``nodes`` are the
    graph nodes every group runs (their specs say whether they probe, and what they need whole)."""
    probing = "probes (the step evaluates the loss again)"
    probes = any(node.spec.needs.closure for node in nodes)
    whole = [f"{node.spec.on_shards} ({node.op})" for node in nodes if node.spec.on_shards is not None]
    on_shards = [probing] * probes + list(dict.fromkeys(whole))
    sharded = sum(p.numel() for p in params if is_shard(p))
    if sharded and on_shards:
        raise OpcompError(
            f"the expression needs {on_shards[0]}, but {sharded:,} of the parameters are DTensor shards (FSDP2's "
            "fully_shard), and opcomp does not run that on shards yet: it would run something else. Use "
            "DistributedDataParallel, or an expression without it — element-wise, matrix (muon_adamw) and layer "
            "statistics (fog, diagfog) run under FSDP2 (docs/distributed.md)"
        )
    local = [w for w, n in (("layer statistics", statistics), (probing, probes)) if n]
    if local and parallel is None and setting == "auto" and dist.is_available() and dist.is_initialized():
        size = dist.get_world_size()
        if size > 1:
            raise OpcompError(
                f"torch.distributed runs {size} processes, and the expression needs {local[0]}, which each rank "
                f"computes from its own batch unless opcomp knows the data-parallel group: {FIX}"
            )


def gathered(values: Sequence[Tensor]) -> list[Tensor]:
    """Whole tensors for DTensor shards (an all-gather each), the others as they are."""
    return [v.full_tensor() if is_shard(v) else v for v in values]


def sharded_like(values: Sequence[Tensor | None], params: Sequence[Tensor]) -> list[Tensor | None]:
    """Each whole value cut to its parameter's shard (every rank holds the whole, so nothing moves)."""
    if not any(is_shard(p) for p in params):
        return list(values)
    from torch.distributed.tensor import distribute_tensor

    return [
        distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None) if v is not None and is_shard(p) else v
        for v, p in zip(values, params)
    ]


def is_shard(tensor: Tensor) -> bool:
    """Whether a parameter is a DTensor (FSDP2's ``fully_shard`` makes every parameter one)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(tensor, DTensor)
