"""torch.distributed.checkpoint (DCP) for opcomp's state under FSDP2.

Saving is DCP's own: ``dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, ...)``
writes each DTensor buffer (Adam's moments, momentum) as the shards the ranks hold and each whole
buffer (KFAC's factors) once. Loading needs a state dict of the saved structure to load into, and
a fresh opcomp optimizer has none: its node state is created by the first step. :func:`load_optimizer`
builds that structure from the checkpoint's own metadata — a shard like its parameter where the
buffer is one, a whole tensor elsewhere — lets DCP fill it, and loads it into the optimizer.

Trust: DCP's ``FileSystemReader`` reads a checkpoint's ``.metadata`` file with ``pickle``, so
loading a crafted checkpoint runs its author's code, as ``torch.load(weights_only=False)`` would.
Load only checkpoints you or someone you trust wrote. (opcomp itself unpickles nothing else.)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

import opcomp
from opcomp.distributed import is_shard


def load_optimizer(checkpoint_id, optimizer: opcomp.Optimizer, key: str = "optim") -> None:
    """Load the optimizer state saved under ``key`` by ``dcp.save`` into ``optimizer`` (built over
    the same, equally sharded parameters); every rank calls it, as every rank called save.

    The checkpoint must be trusted: its metadata is read with pickle (torch's FileSystemReader), so a
    crafted one runs code, as ``torch.load(weights_only=False)`` would."""
    metadata = dcp.FileSystemReader(checkpoint_id).read_metadata()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    template: dict[str, Any] = {}
    for flat, stored in metadata.state_dict_metadata.items():
        path = metadata.planner_data[flat]
        if path[0] != key:
            continue
        value = None  # a saved Python object (an lr, an expression): DCP puts it in place
        if isinstance(stored, TensorStorageMetadata):
            value = _empty_like_saved(stored, path, params)
        _put(template, path, value)
    dcp.load(template, checkpoint_id=checkpoint_id)
    state = template[key]
    state["state"] = {int(index): entry for index, entry in state.get("state", {}).items()}
    optimizer.load_state_dict(state)


def _empty_like_saved(stored: TensorStorageMetadata, path: tuple, params: list[torch.Tensor]) -> torch.Tensor:
    """A tensor for DCP to load into: its parameter's kind of shard for a buffer shaped like a
    sharded parameter (``state.<index>.<node>.<buffer>``), a whole tensor otherwise."""
    dtype = stored.properties.dtype
    if len(path) == 5 and path[1] == "state":
        param = params[int(path[2])]
        if is_shard(param) and tuple(stored.size) == tuple(param.shape):
            return torch.zeros_like(param, dtype=dtype)
        return torch.empty(stored.size, dtype=dtype, device=param.device)
    return torch.empty(stored.size, dtype=dtype)


def _put(root: dict, path: tuple, value) -> None:
    """``value`` at ``path`` in nested dicts and lists (an int step is a list index)."""
    node: Any = root
    for step, following in zip(path[:-1], path[1:]):
        empty: Any = [] if isinstance(following, int) else {}
        if isinstance(node, list):
            node.extend([None] * (step + 1 - len(node)))
            node[step] = empty if node[step] is None else node[step]
        else:
            node.setdefault(step, empty)
        node = node[step]
    last = path[-1]
    if isinstance(node, list):
        node.extend([None] * (last + 1 - len(node)))
    node[last] = value
