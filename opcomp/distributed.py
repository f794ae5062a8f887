"""Data-parallel training: every rank computes the step one process would on the global batch.

Under ``DistributedDataParallel`` the gradients ``backward()`` leaves are already averaged over the
ranks; what opcomp computes itself is not. So opcomp reduces, over the data-parallel group, exactly
what it adds: layer statistics (KFAC's factors, their diagonals, EKFAC's correction; weighted by
each rank's count of rows or examples, so uneven batches still give the global batch's factors),
the gradients of its own backward passes (the closure's first evaluation, SAM's and ``grad_at``'s
shifted points, averaged as DDP averages), Hessian and Gauss–Newton products, and the losses that
zeroth-order estimates difference. Noise is seeded from the node and the step, so it is the same
on every rank. Every reduction is one ``all_reduce`` per device and dtype over a flat buffer.

What opcomp cannot do exactly is refused when the optimizer is built (:func:`check`): layer
statistics or probes on FSDP2's sharded (DTensor) parameters, and layer statistics or probes under
an initialized process group whose data-parallel group opcomp was not told.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
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

    def shared(self, results: Sequence[Tensor | None], shapes: Sequence[torch.Size], like: Tensor) -> list[Tensor]:
        """Every rank's share of the work, on every rank: each result is computed by its owner (and
        None elsewhere), and one sum in which the others add zeros hands it to all, bit for bit."""
        filled = [r if r is not None else like.new_zeros(shape) for r, shape in zip(results, shapes)]
        return self.sum(filled)

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
    if isinstance(setting, str):
        if setting not in ("auto", "local"):
            raise OpcompError(
                f"data_parallel must be 'auto', 'local' or a torch.distributed process group, got {setting!r}"
            )
        if setting == "local" or not wrapper:
            return _unwrapped(model), None
        group = model.process_group
    else:
        if not (dist.is_available() and dist.is_initialized()):
            raise OpcompError("data_parallel= names a process group, but torch.distributed is not initialized")
        group = setting
    size = dist.get_world_size(group)
    inner = _unwrapped(model)
    first = next(inner.parameters(), None) if inner is not None else None
    device = first.device if first is not None else torch.device("cpu")
    return inner, DataParallel(group, size, device) if size > 1 else None


def _unwrapped(model: nn.Module | None) -> nn.Module | None:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def check(
    params: Sequence[Tensor],
    parallel: DataParallel | None,
    setting: Setting,
    *,
    statistics: bool,
    probes: bool,
    global_norm: bool,
) -> None:
    """Refuse, at build time, what would silently run rank-local or on shards."""
    needs = [
        what
        for what, needed in (
            ("layer statistics", statistics),
            ("probes (the step evaluates the loss again)", probes),
            ("a norm over every parameter (clip_global)", global_norm),
        )
        if needed
    ]
    sharded = sum(p.numel() for p in params if _is_dtensor(p))
    if sharded and needs:
        raise OpcompError(
            f"the expression needs {needs[0]}, but {sharded:,} of the parameters are DTensor shards (FSDP2's "
            "fully_shard): opcomp computes that from whole tensors and does not shard it yet, so under FSDP2 it "
            "would run something else. Use DistributedDataParallel, or an element-wise or matrix expression "
            "such as muon_adamw (docs/distributed.md)"
        )
    local = [what for what in needs if "clip_global" not in what]  # a norm of replicated gradients is global
    if local and parallel is None and setting == "auto" and dist.is_available() and dist.is_initialized():
        size = dist.get_world_size()
        if size > 1:
            raise OpcompError(
                f"torch.distributed runs {size} processes, and the expression needs {local[0]}, which each rank "
                f"computes from its own batch unless opcomp knows the data-parallel group: {FIX}"
            )


def _is_dtensor(tensor: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(tensor, DTensor)
