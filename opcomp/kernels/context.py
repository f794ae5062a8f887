"""What a kernel sees: its options, its parameters and their gradients, its node's state.

Three views, one per way a kernel runs: :class:`Ctx` for a node over one bucket (element-wise,
slab and matrix kernels), :class:`ProbeCtx` for a probe over every parameter of an expression
that runs it, and (in :mod:`opcomp.kernels.layer_context`) ``LayerCtx`` for layer statistics. All reach
state through :class:`opcomp.state.NodeState`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from opcomp.closure import Probe
from opcomp.distributed import DataParallel
from opcomp.finite import Checks
from opcomp.ops import Options
from opcomp.precision import working
from opcomp.state import NodeState


@dataclass
class BucketStep:
    """One step of one bucket: parameters of equal shape, dtype and device that have a gradient.

    Values flowing between kernels are lists of tensors in the working precision (:func:`working`),
    one per parameter. Kernels never modify their inputs (a value may be read by several nodes);
    they own their state and outputs.
    """

    params: list[Tensor]
    states: list[dict]  # per parameter: opcomp's state dict, state_key -> {buffer: tensor}
    probed: dict[str, list[Tensor]] = field(default_factory=dict)  # a rebinding node's key -> its g per parameter
    _grads: list[Tensor] | None = field(default=None, repr=False)
    _working_params: list[Tensor] | None = field(default=None, repr=False)

    # plain properties caching into fields (torch.compile traces these; functools.cached_property it does not)
    @property
    def grads(self) -> list[Tensor]:
        if self._grads is None:
            self._grads = [working(p.grad) for p in self.params]
        return self._grads

    @property
    def working_params(self) -> list[Tensor]:
        """The parameters in the working precision: themselves when already in it (steps run under
        no_grad, and a detached view would hand a compiled step two aliases of one tensor), else
        fp32 copies of half-precision parameters."""
        if self._working_params is None:
            self._working_params = [working(p) for p in self.params]
        return self._working_params


@dataclass
class Ctx:
    """A kernel's view of one node over one bucket."""

    options: Options
    bucket: BucketStep
    state_key: str
    scope: str | None = None  # the rebinding node (sam) whose gradient this node's g is
    parallel: DataParallel | None = None  # ranks that split matrix work among them
    _state: NodeState | None = field(default=None, repr=False)

    @property
    def params(self) -> list[Tensor]:
        return self.bucket.params

    @property
    def node_state(self) -> NodeState:
        if self._state is None:
            self._state = NodeState(self.bucket.states, self.bucket.params, self.state_key)
        return self._state

    @property
    def state(self) -> list[dict]:
        """This node's state dict for each parameter (created empty on first use)."""
        return self.node_state.entries

    def buffers(self, name: str) -> list[Tensor]:
        return self.node_state.buffers(name)

    def tick(self) -> list[Tensor]:
        """Advance the node's step counters on the device; returns them (:meth:`NodeState.tick`)."""
        return self.node_state.tick()


@dataclass
class ProbeCtx:
    """A probe kernel's view: its options, the flat parameters running it, their state, the probe."""

    options: Options
    state: NodeState
    probe: Probe
    grads: list[Tensor | None]  # the raw gradient per parameter (None where it was not computed)
    layers: list[list[int]]  # indices of params grouped by the module that owns them
    checks: Checks  # the step's finiteness checks (opcomp.finite)
    # for a rebinding probe: per parameter, v̂ of the second moment its inner declares, after this
    # step's raw update (None where the inner keeps none); computed when asked
    second_moments: Callable[[], list[Tensor | None]] | None = None

    @property
    def params(self) -> list[Tensor]:
        return self.state.params

    def advance(self) -> int:
        """Steps this node took before this one, on the host (all parameters step together); then advance."""
        return self.state.advance()

    def generator(self, step: int, device: torch.device) -> torch.Generator:
        """A generator seeded by the node's key and the step: a resumed run draws the same noise."""
        digest = hashlib.sha256(f"{self.state.key}#{step}".encode()).digest()
        return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
