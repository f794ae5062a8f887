"""The operator registry: one :class:`OpSpec` per operator, the single source of truth.

The parser knows no operator names; name resolution, option checking, arity, the graph's
requirement checks, ``opcomp explain`` and the generated catalogue (docs/operators.md) all read
these specs. Kernels attach to the same names in the runtime.
"""

from __future__ import annotations

import enum
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from opcomp.ops.fields import Count


class Kind(enum.StrEnum):
    """The role an operator plays (docs/operators.md)."""

    SOURCE = "source"  # a value read or probed
    TEMPORAL = "temporal"  # state over steps
    STATISTICAL = "statistical"  # curvature / statistics preconditioners
    STRUCTURAL = "structural"  # geometry of the update
    PROBE = "probe"  # extra forward/backward work per step
    COMBINATOR = "combinator"  # the language's own + - * |


class Applies(enum.StrEnum):
    """Which parameters an operator can act on; anything else falls through ``|``."""

    ANY = "any"
    MATRIX = "matrix"  # ndim >= 2 (viewed as rows x rest)
    LAYER = "layer"  # a weight or bias of a supported module: Linear, Conv1D, Conv2d, Embedding
    HIDDEN = "hidden"  # a hidden layer's weight: of a Linear, Conv1D or Conv2d of its own, not the output head


class Options(BaseModel):
    """Base of every operator's options: strict types, no unknown keys, immutable."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class NoOptions(Options):
    """For operators without options."""


class LayerOptions(Options):
    """Base of every layer operator's options: the runtime arms statistics capture by it."""

    update_every: Count = Field(1, description="steps between statistics captures")


@dataclass(frozen=True)
class Needs:
    """What an operator asks of the training loop and of ``opcomp.build``."""

    closure: bool = False  # must be stepped with opt.step(closure)
    model: bool = False  # needs the nn.Module (hooks or functional calls), not bare parameters
    double_backward: bool = False  # differentiates through the gradient
    forward_only: bool = False  # estimates from loss values alone
    likelihood: bool = False  # samples labels from the model's output (opcomp.build(..., likelihood=))

    def __or__(self, other: Needs) -> Needs:
        return Needs(*(a or b for a, b in zip(_astuple(self), _astuple(other))))

    def describe(self) -> list[str]:
        names = {
            "closure": "a closure: call opt.step(closure)",
            "model": "the model (build with the nn.Module, not .parameters())",
            "double_backward": "a differentiable backward pass (create_graph)",
            "forward_only": "extra forward passes",
            "likelihood": "a likelihood to sample labels from: opcomp.build(..., likelihood=...)",
        }
        return [names[k] for k, v in zip(names, _astuple(self)) if v]


def _astuple(needs: Needs) -> tuple[bool, ...]:
    return (needs.closure, needs.model, needs.double_backward, needs.forward_only, needs.likelihood)


@dataclass(frozen=True)
class Cost:
    """Extra work an operator adds to a step, beyond the one forward (and backward) of training."""

    forward: float = 0.0
    backward: float = 0.0
    memory: str = ""  # what it holds while the step runs
    per_layer: bool = False  # the passes repeat for every layer

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.forward + other.forward, self.backward + other.backward)


StateShape = Literal[
    "param", "scalar", "rows", "cols", "left", "right", "in_factor", "out_factor", "in_diag", "out_diag", "layer_matrix"
]


def matrix_sides(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(m, n) of a parameter's matrix view, shape[0] × the rest (a Conv2d weight as out × in·kh·kw);
    None for a parameter of fewer than two dimensions, which has none."""
    if len(shape) < 2:
        return None
    return shape[0], math.prod(shape[1:])


@dataclass(frozen=True)
class StateBuffer:
    """A tensor the operator keeps per parameter, in fp32.

    ``shape`` is relative to the parameter: 'param' is its shape; 'rows' (m,), 'cols' (n,), 'left'
    (m, m) and 'right' (n, n) are those of its matrix view m × n (shape[0] × the rest: a Conv2d
    weight as out × in·kh·kw), kept only for parameters of two or more dimensions; for a layer whose matrix X is
    (out, in) (the bias folded into the input side) the factors are (in, in) / (out, out), the
    diagonals (in,) / (out,) and 'layer_matrix' is (out, in). An Embedding's X is
    (dim, vocabulary) and its input factor a diagonal (vocabulary,).
    """

    name: str
    shape: StateShape
    doc: str
    nonnegative: bool = False  # a mean of squares: a saved negative value is corrupt


@dataclass(frozen=True)
class SecondMoment:
    """A running second moment an operator keeps, which ``sam[fisher]`` weighs its ascent by
    (docs/probes.md, "SAM and what its inner sees"): v in ``buffer``, decaying by the option
    ``beta``, bias-corrected by the node's step count when ``debiased``."""

    buffer: str
    beta: str
    debiased: bool


@dataclass(frozen=True)
class OpSpec:
    """One operator: everything about it except its kernel."""

    name: str
    kind: Kind
    summary: str  # one line: what it computes
    formula: str  # the exact meaning, as tests check it
    options: type[Options] = NoOptions
    params: tuple[str, ...] = ("x",)  # argument names; () for leaves
    aliases: tuple[str, ...] = ()
    applies: Applies = Applies.ANY
    applies_when: Callable[[Any], Applies] | None = None  # narrower, when the options say so
    needs: Needs = Needs()
    needs_when: Callable[[Any], Needs] | None = None  # what it needs, when that depends on the options
    state: tuple[StateBuffer, ...] = ()
    binds_gradient: bool = False  # its argument sees `g` as a probed gradient (sam)
    second_moment: SecondMoment | None = None  # a statistic a rebinding probe may read
    reads_gradient: bool = False  # needs the training backward (the raw gradient or its graph)
    per_example: bool = False  # a layer node that reads each example's gradient at every position (EKFAC)
    replaces_state: bool = False  # its kernel stores new tensors, never writes into its buffers: a snapshot shares them
    cost: Cost = Cost()
    cost_when: Callable[[Any], Cost] | None = None  # the cost, when it depends on the options
    refuses: Callable[[Any], str | None] | None = None  # options valid alone that fail together: why, or None
    symbol: str | None = None  # combinators: written with a symbol, not called by name
    variadic: bool = False  # combinators taking two or more inputs
    lr: float | None = None  # the measured learning rate of an update whose scale it sets (opcomp.learning_rates)
    kind_lrs: dict[str, float] = field(default_factory=dict)  # the same on a kind of model where it differs
    # ({"transformer": 0.003}; the kinds: learning_rates.model_kind)
    scale_of: int | None = None  # its output has the scale of this argument (by position): the lr is that one's
    factor_block: Callable[[Any], int] | None = None  # the longest matrix-view side whose factor it keeps whole;
    # a longer side's factor ('left', 'right' buffers) is kept as diagonal blocks of this size (FactorForm)
    on_shards: str | None = None  # what it needs whole that FSDP2's shards do not hold (refused there at build)
    host_counted: bool = False  # counts its steps on the host (update/invert schedules): its family steps eagerly
    fused_adamw: frozenset[str] | None = None  # the options torch's fused AdamW expresses (opcomp.step.fused)

    @property
    def arity(self) -> int:
        return len(self.params)

    @property
    def differentiates_twice(self) -> bool:
        """Differentiates the training pass's graph again: Hessian products the gradient,
        Gauss–Newton products the backward through the model's outputs."""
        return self.needs.double_backward or (self.needs.closure and self.needs.model)

    @property
    def callable(self) -> bool:
        return self.symbol is None

    def cost_for(self, options: Options) -> Cost:
        return self.cost_when(options) if self.cost_when else self.cost

    def applies_for(self, options: Options) -> Applies:
        return self.applies_when(options) if self.applies_when else self.applies

    def needs_for(self, options: Options) -> Needs:
        return self.needs_when(options) if self.needs_when else self.needs

    def option_fields(self) -> dict[str, Any]:
        return dict(self.options.model_fields)

    def flag_target(self, flag: str) -> tuple[str, Any] | None:
        """What a bare flag means: a bool option set true, or the one enum option having that value."""
        fields = self.option_fields()
        if flag in fields and fields[flag].annotation is bool:
            return flag, True
        owners = [name for name, f in fields.items() if flag in enum_values(f.annotation)]
        return (owners[0], flag) if len(owners) == 1 else None

    def words(self) -> set[str]:
        """Every enum value any option accepts (for suggestions)."""
        return {w for f in self.option_fields().values() for w in enum_values(f.annotation)}


def bounds(field: Any) -> dict[str, float]:
    """The numeric bounds of an option field, as {'ge'|'gt'|'le'|'lt': value}."""
    found: dict[str, float] = {}
    for meta in field.metadata:
        for key in ("ge", "gt", "le", "lt"):
            if hasattr(meta, key):
                found[key] = getattr(meta, key)
    return found


def enum_values(annotation: Any) -> tuple[str, ...]:
    """The allowed words of a ``Literal[...]`` option, else ()."""
    if typing.get_origin(annotation) is Literal:
        return tuple(str(a) for a in typing.get_args(annotation))
    return ()


@dataclass
class Registry:
    """Name -> spec, with aliases; filled by the family modules at import."""

    specs: dict[str, OpSpec] = field(default_factory=dict)
    alias_of: dict[str, str] = field(default_factory=dict)

    def add(self, spec: OpSpec) -> OpSpec:
        if spec.applies is Applies.LAYER and not issubclass(spec.options, LayerOptions):
            raise TypeError(f"layer operator {spec.name!r}: its options must derive from LayerOptions")
        for name in (spec.name, *spec.aliases):
            if name in self.specs or name in self.alias_of:
                raise ValueError(f"operator name {name!r} registered twice")
        self.specs[spec.name] = spec
        for alias in spec.aliases:
            self.alias_of[alias] = spec.name
        return spec

    def get(self, name: str) -> OpSpec | None:
        """The callable operator spelled ``name`` (its own name or an alias), if any."""
        spec = self.specs.get(self.alias_of.get(name, name))
        return spec if spec is not None and spec.callable else None

    def __getitem__(self, name: str) -> OpSpec:
        return self.specs[self.alias_of.get(name, name)]

    def names(self) -> list[str]:
        """Every name a user may call: operators and aliases."""
        return sorted(n for n in [*self.specs, *self.alias_of] if self.get(n) is not None)

    def __iter__(self):
        return iter(self.specs.values())


REGISTRY = Registry()
register = REGISTRY.add
