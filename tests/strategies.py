"""Hypothesis strategies for syntax trees.

``canonical_exprs`` draws trees that are already in canonical form, straight from the registry:
every option explicit with a value inside its pydantic bounds, sorted, no aliases. Fallback
branches before the last are restricted (so no branch is dead) and ``sam`` never nests, so each
drawn tree is a valid expression.

``raw_exprs`` draws any tree the parser can produce: unknown names, flags, aliases, arbitrary
option values, arithmetic in every position.
"""

from __future__ import annotations

from hypothesis import strategies as st
from pydantic import ValidationError

from opcomp.lang.ast import Call, Fallback, Name, Neg, Num, Option, Product, Sum
from opcomp.ops import REGISTRY, Applies
from opcomp.ops.registry import bounds, enum_values
from opcomp.resolve import option_expr

CALLABLE = [s for s in REGISTRY if s.callable and s.name not in ("g", "p")]
RESTRICTED = [s for s in CALLABLE if s.applies is not Applies.ANY and s.arity == 1]

finite_floats = st.floats(allow_nan=False, allow_infinity=False)


def field_values(field) -> st.SearchStrategy:
    """Values the option's pydantic field accepts."""
    words = enum_values(field.annotation)
    if words:
        return st.sampled_from(words)
    if field.annotation is bool:
        return st.booleans()
    b = bounds(field)
    if field.annotation is int:
        low = b.get("ge", b.get("gt", -(10**6)) + 1)
        high = b.get("le", b.get("lt", 10**6) - 1)
        return st.integers(low, min(high, low + 1000))
    low = b.get("ge", b.get("gt", -1e6))
    high = b.get("le", b.get("lt", 1e6))
    return st.floats(low, high, exclude_min="gt" in b, exclude_max="lt" in b, allow_nan=False, allow_infinity=False)


@st.composite
def options_of(draw, spec):
    """A valid options object of ``spec``, as canonical Option nodes."""
    fields = spec.option_fields()
    for _ in range(20):
        values = {name: draw(field_values(f)) for name, f in fields.items()}
        try:
            model = spec.options(**values)
        except ValidationError:  # a cross-option rule, e.g. momentum's nesterov
            continue
        if spec.refuses is not None and spec.refuses(model) is not None:  # e.g. zo[newton] with eps² = 0
            continue
        return tuple(Option(k, option_expr(getattr(model, k))) for k in sorted(fields))
    return tuple(Option(k, option_expr(getattr(spec.options(), k))) for k in sorted(fields))


def call(spec, options, args) -> Call | Name:
    return Call(spec.name, options, tuple(args)) if options or args else Name(spec.name)


@st.composite
def canonical_exprs(draw, depth: int = 3, in_sam: bool = False):
    leaves = [st.just(Name("g")), st.just(Name("p")), options_of(REGISTRY["zo"]).map(lambda o: Call("zo", o))]
    if depth <= 0:
        return draw(st.one_of(leaves))
    choice = draw(st.sampled_from(["leaf", "op", "op", "scale", "sum", "fallback"]))
    sub = canonical_exprs(depth - 1, in_sam)
    if choice == "leaf":
        return draw(st.one_of(leaves))
    if choice == "op":
        specs = [s for s in CALLABLE if s.arity > 0 and not (in_sam and s.binds_gradient)]
        spec = draw(st.sampled_from(specs))
        inner = canonical_exprs(depth - 1, in_sam or spec.binds_gradient)
        args = [draw(inner) for _ in range(spec.arity)]
        return call(spec, draw(options_of(spec)), args)
    if choice == "scale":
        direction = draw(sub.filter(lambda e: not isinstance(e, Product)))
        return Product((Num(draw(finite_floats)), direction))
    if choice == "sum":
        terms = tuple(draw(st.lists(sub, min_size=2, max_size=3)))
        ops = tuple(draw(st.sampled_from("+-")) for _ in terms[1:])
        return Sum(terms, ops)
    count = draw(st.integers(2, 3))
    branches = []
    for _ in range(count - 1):  # a restricted branch first, so the next one is reachable
        spec = draw(st.sampled_from(RESTRICTED))
        branches.append(call(spec, draw(options_of(spec)), [draw(sub)]))
    branches.append(draw(sub))
    return Fallback(tuple(branches))


names = st.one_of(
    st.sampled_from(REGISTRY.names()),
    st.sampled_from(["fog", "diagfog", "sgd", "muon_adamw", "kfac_sgd", "fisher", "true", "lam", "rho"]),
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True),
)
numbers = st.one_of(st.integers(-(10**6), 10**6), finite_floats).map(Num)


@st.composite
def raw_exprs(draw, depth: int = 3):
    if depth <= 0:
        return draw(st.one_of(names.map(Name), numbers))
    sub = raw_exprs(depth - 1)
    choice = draw(st.sampled_from(["name", "number", "call", "call", "neg", "product", "sum", "fallback"]))
    if choice == "name":
        return Name(draw(names))
    if choice == "number":
        return draw(numbers)
    if choice == "call":
        options = tuple(Option(draw(names), draw(st.one_of(st.none(), sub))) for _ in range(draw(st.integers(0, 2))))
        args = tuple(draw(st.lists(sub, min_size=0 if options else 1, max_size=2)))
        return Call(draw(names), options, args)
    if choice == "neg":
        return Neg(draw(sub.filter(lambda e: not isinstance(e, Num))))
    if choice == "product":
        return Product(tuple(draw(st.lists(sub, min_size=2, max_size=3))))
    if choice == "sum":
        terms = tuple(draw(st.lists(sub, min_size=2, max_size=3)))
        return Sum(terms, tuple(draw(st.sampled_from("+-")) for _ in terms[1:]))
    return Fallback(tuple(draw(st.lists(sub, min_size=2, max_size=3))))
