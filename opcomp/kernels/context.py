"""What a kernel sees: its options, its bucket's parameters, their gradients, its own state."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from opcomp.ops import Options
from opcomp.precision import working, working_dtype


@dataclass
class BucketStep:
    """One step of one bucket: parameters of equal shape, dtype and device that have a gradient.

    Values flowing between kernels are lists of tensors in the working precision (:func:`working`),
    one per parameter. Kernels never modify their inputs (a value may be read by several nodes);
    they own their state and outputs.
    """

    params: list[Tensor]
    states: list[dict]  # per parameter: opcomp's state dict, state_key -> {buffer: tensor}
    probed: dict[str, list[Tensor]] = field(default_factory=dict)  # sam's key -> g_sam per parameter
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


def advance(state: dict, device, name: str = "step") -> int:
    """How often the counter ``name`` in ``state`` was advanced before (it starts at 0); advances it.

    For collective kernels, which need the count as a number; ``Ctx.tick`` keeps it a tensor.
    """
    counter = state.setdefault(name, torch.zeros((), dtype=torch.float32, device=device))
    taken = int(counter.item())
    counter += 1
    return taken


@dataclass
class Ctx:
    """A kernel's view of one node over one bucket."""

    options: Options
    bucket: BucketStep
    state_key: str
    scope: str | None = None  # the sam whose probed gradient this node's g is
    _state: list[dict] | None = field(default=None, repr=False)

    @property
    def params(self) -> list[Tensor]:
        return self.bucket.params

    @property
    def state(self) -> list[dict]:
        """This node's state dict for each parameter (created empty on first use)."""
        if self._state is None:
            self._state = [s.setdefault(self.state_key, {}) for s in self.bucket.states]
        return self._state

    def buffers(self, name: str) -> list[Tensor]:
        """State buffer ``name`` per parameter, in the working precision, zero on first use."""
        out = []
        for state, param in zip(self.state, self.params):
            if name not in state:
                dtype = working_dtype(param.dtype)
                state[name] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
            out.append(state[name])
        return out

    def tick(self) -> list[Tensor]:
        """Advance this node's per-parameter step counters; returns them (0-d tensors, fp32, or
        fp64 for fp64 parameters so that bias corrections are exact in double as torch's are).

        Counters live on the parameter's device and bias corrections are computed from them as
        tensors, so a compiled step neither synchronises nor recompiles as they grow.
        """
        steps = []
        for state, param in zip(self.state, self.params):
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=working_dtype(param.dtype), device=param.device)
            steps.append(state["step"])
        torch._foreach_add_(steps, 1.0)
        return steps
