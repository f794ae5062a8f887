"""Syntax tree -> canonical syntax tree: names, aliases, definitions, options, arithmetic.

The canonical tree is what ``opcomp.format`` prints and what the graph is built from:

- aliases become operator names (``grad`` → ``g``, ``adarms`` → ``adam``);
- a bare operator name or a call without arguments gets ``g`` (``adamw`` → ``adamw(g)``);
- definitions and presets are expanded, their options substituted;
- every option is explicit, validated by the operator's pydantic model, sorted by name;
  flags become ``name=value`` (``sam[fisher]`` → ``sam[mode=fisher, ...]``);
- number arithmetic is folded: a scaled direction is always ``Product((Num(c), x))`` with
  ``c`` a float, nested scalings multiply, and ``-x`` is ``-1.0 * x``.

Every mistake raises an :class:`OpcompError` pointing at the place it was written.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import ValidationError

from opcomp.definitions import Constant, Namespace, constant, presets
from opcomp.errors import (
    ArityError,
    CompositionError,
    DefinitionError,
    OpcompError,
    OptionValueError,
    UnknownNameError,
    UnknownOptionError,
    closest,
)
from opcomp.lang.ast import Call, Definition, Expr, Fallback, Name, Neg, Num, Option, Product, Sum
from opcomp.lang.parser import MAX_NESTING, MAX_TEXT, bracket_depth
from opcomp.lang.printer import to_source
from opcomp.lang.source import Span
from opcomp.ops import REGISTRY, OpSpec
from opcomp.ops.registry import enum_values

MAX_EXPANSION = 32
"""Deepest chain of definitions using definitions."""

MAX_RESOLVED = 20_000
"""Most syntax nodes an expression may expand to, definitions included. Definitions that use each
other twice double at each level (``a2 = a1 + a1``), so without a bound twenty lines would take
minutes; the largest preset expands to fewer than 100."""

Value = Constant | Expr  # a number/word, or a direction (canonical expression)


def is_direction(value: Value) -> bool:
    return not isinstance(value, (int, float, bool, str))


@dataclass(frozen=True)
class _Scope:
    bindings: Mapping[str, Constant]  # the options of the definition being expanded
    expanding: tuple[str, ...] = ()  # definitions being expanded, outermost first


def canonicalize(expr: Expr, namespace: Namespace | None = None) -> Expr:
    """The canonical tree of ``expr``; ``namespace`` defaults to the presets."""
    resolver = _Resolver(presets() if namespace is None else namespace)
    try:
        value = resolver.value(expr, _Scope({}))
    except RecursionError:
        raise CompositionError("the expression is nested too deeply to resolve", expr.span) from None
    if not is_direction(value):
        raise CompositionError(
            f"the expression is the {_describe(value)}, not a direction — write an operator such as 'adamw'",
            expr.span,
        )
    _check_readable(to_source(value), expr.span)
    return value


def _check_readable(canonical: str, span: Span | None) -> None:
    """Canonical text must parse again: within the parser's length and nesting limits."""
    if len(canonical) > MAX_TEXT:
        raise DefinitionError(
            f"with its definitions expanded, the expression is {len(canonical):,} characters long; opcomp "
            f"reads at most {MAX_TEXT:,} — definitions that use another one several times multiply its size",
            span,
        )
    depth = bracket_depth(canonical)
    if depth > MAX_NESTING:
        raise CompositionError(
            f"with its definitions expanded, the expression nests brackets {depth} deep; opcomp reads "
            f"at most {MAX_NESTING} — compose fewer operators inside each other",
            span,
        )


def _describe(value: Constant) -> str:
    if isinstance(value, bool):
        return f"word '{str(value).lower()}'"
    if isinstance(value, str):
        return f"word '{value}'"
    return f"number {value}"


def literal(value: Expr) -> Constant:
    """A canonical option value back to Python: numbers, true/false, words."""
    result = constant(value)
    if result is None:
        raise TypeError(f"not a canonical option value: {value!r}")
    return result


def option_expr(value: Constant, span: Span | None = None) -> Expr:
    """A Python option value as canonical syntax."""
    if isinstance(value, bool):
        return Name("true" if value else "false", span)
    if isinstance(value, str):
        return Name(value, span)
    return Num(value, span)


class _Resolver:
    def __init__(self, namespace: Namespace) -> None:
        self.namespace = namespace
        self.resolved = 0  # syntax nodes visited, definitions expanded in place

    # -- values -------------------------------------------------------------------------------

    def value(self, expr: Expr, scope: _Scope) -> Value:
        self.resolved += 1
        if self.resolved > MAX_RESOLVED:
            raise DefinitionError(
                f"the expression expands to more than {MAX_RESOLVED:,} terms — definitions that use "
                "another definition several times multiply its size at each level; share a term by "
                "writing it once",
                expr.span,
            )
        if isinstance(expr, Num):
            return expr.value
        if isinstance(expr, Name):
            if expr.name in scope.bindings:
                return scope.bindings[expr.name]
            return self.call(expr.name, (), (), expr.span, scope)
        if isinstance(expr, Call):
            if expr.name in scope.bindings:
                raise CompositionError(
                    f"'{expr.name}' is an option of the definition here, not an operator — "
                    "options and arguments go on operators",
                    expr.span,
                )
            return self.call(expr.name, expr.options, expr.args, expr.span, scope)
        if isinstance(expr, Neg):
            operand = self.value(expr.operand, scope)
            if is_direction(operand):
                return _scale(-1.0, operand, expr.span)
            return _arithmetic(operator.neg, expr.span, self.number(operand, expr.operand, "'-'"))
        if isinstance(expr, Product):
            return self.product(expr, scope)
        if isinstance(expr, Sum):
            return self.sum(expr, scope)
        if isinstance(expr, Fallback):
            branches = tuple(self.direction(b, scope, "each branch of '|'") for b in expr.branches)
            return Fallback(branches, expr.span)
        raise TypeError(f"not an expression node: {expr!r}")

    def direction(self, expr: Expr, scope: _Scope, role: str) -> Expr:
        value = self.value(expr, scope)
        if not is_direction(value):
            raise CompositionError(f"{role} must be a direction, but this is the {_describe(value)}", expr.span)
        return value

    def number(self, value: Constant, expr: Expr, role: str) -> int | float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CompositionError(f"{role} needs numbers, but this is the {_describe(value)}", expr.span)
        return value

    def product(self, expr: Product, scope: _Scope) -> Value:
        coefficient: int | float = 1
        direction: Expr | None = None
        for factor in expr.factors:
            value = self.value(factor, scope)
            if not is_direction(value):
                coefficient = _arithmetic(operator.mul, expr.span, coefficient, self.number(value, factor, "'*'"))
            elif direction is None:
                direction = value
            else:
                raise CompositionError(
                    "cannot multiply two directions — '*' scales a direction by a number", factor.span
                )
        if direction is None:
            return _finite(coefficient, expr.span)
        return _scale(coefficient, direction, expr.span)

    def sum(self, expr: Sum, scope: _Scope) -> Value:
        values = [self.value(term, scope) for term in expr.terms]
        directions = [is_direction(v) for v in values]
        if all(directions):
            return Sum(tuple(values), expr.ops, expr.span)
        if any(directions):
            index = directions.index(False)
            raise CompositionError(
                f"cannot add the {_describe(values[index])} to a direction — "
                "scale directions with '*' instead (e.g. 0.5 * adamw + 0.5 * muon)",
                expr.terms[index].span,
            )
        total = self.number(values[0], expr.terms[0], f"'{expr.ops[0]}'")
        for op, term, value in zip(expr.ops, expr.terms[1:], values[1:]):
            number = self.number(value, term, f"'{op}'")
            total = _arithmetic(operator.add if op == "+" else operator.sub, expr.span, total, number)
        return _finite(total, expr.span)

    # -- calls --------------------------------------------------------------------------------

    def call(
        self, name: str, options: tuple[Option, ...], args: tuple[Expr, ...], span: Span | None, scope: _Scope
    ) -> Value:
        spec = REGISTRY.get(name)
        if spec is not None:
            return self.apply(spec, options, args, span, scope)
        definition = self.namespace.get(name)
        if definition is not None:
            return self.expand(definition, options, args, span, scope)
        candidates = [*REGISTRY.names(), *self.namespace.names(), *scope.bindings]
        guess = closest(name, candidates)
        hint = f" — did you mean '{guess}'?" if guess else " — `opcomp operators` lists them"
        raise UnknownNameError(f"unknown operator '{name}'{hint}", span, suggestion=guess)

    def apply(
        self, spec: OpSpec, options: tuple[Option, ...], args: tuple[Expr, ...], span: Span | None, scope: _Scope
    ) -> Expr:
        values = self.option_values(spec.name, options, scope, spec.option_fields(), spec.flag_target, spec.words())
        try:
            model = spec.options(**values)
        except ValidationError as error:
            raise _option_error(spec, error, options, span) from None
        refused = spec.refuses(model) if spec.refuses is not None else None
        if refused is not None:
            raise OptionValueError(f"options of '{spec.name}': {refused}", span)
        if not args and spec.arity == 1:
            args = (Name("g", span),)
        if len(args) != spec.arity:
            raise _arity_error(spec, args, span)
        inputs = tuple(self.direction(a, scope, f"argument '{p}' of '{spec.name}'") for a, p in zip(args, spec.params))
        canonical_options = tuple(
            Option(key, option_expr(getattr(model, key), span), span) for key in sorted(spec.option_fields())
        )
        if not canonical_options and not inputs:
            return Name(spec.name, span)
        return Call(spec.name, canonical_options, inputs, span)

    def option_values(self, owner, options, scope, fields, flag_target, words) -> dict[str, Constant]:
        """Option syntax -> {name: value}: flags resolved, values evaluated, repeats refused."""
        values: dict[str, Constant] = {}
        for option in options:
            if option.value is None:
                target = flag_target(option.name)
                if target is None:
                    raise _unknown_option(owner, option, fields, words, flag=True)
                key, value = target
            else:
                if option.name not in fields:
                    raise _unknown_option(owner, option, fields, words, flag=False)
                key, value = option.name, self.option_value(option.value, scope)
            if key in values:
                raise OptionValueError(f"option '{key}' of '{owner}' is given twice", option.span)
            values[key] = value
        return values

    def option_value(self, expr: Expr, scope: _Scope) -> Constant:
        """Option values are numbers, true/false or words; number arithmetic is allowed."""
        if isinstance(expr, Name):
            if expr.name in scope.bindings:
                return scope.bindings[expr.name]
            return {"true": True, "false": False}.get(expr.name, expr.name)
        if isinstance(expr, Num):
            return expr.value
        if isinstance(expr, (Neg, Product, Sum)):
            value = self.value(expr, scope)
            if not is_direction(value):
                return value
        raise OptionValueError(f"an option value is a number, true/false or a word, not '{to_source(expr)}'", expr.span)

    def expand(
        self, definition: Definition, options: tuple[Option, ...], args: tuple[Expr, ...], span, scope: _Scope
    ) -> Value:
        name = definition.name
        if args:
            raise ArityError(
                f"'{name}' is a definition and takes no arguments — its options go in brackets: {name}[...]",
                args[0].span or span,
            )
        if name in scope.expanding:
            chain = " → ".join((*scope.expanding[scope.expanding.index(name) :], name))
            raise DefinitionError(f"definition '{name}' refers to itself ({chain})", span)
        if len(scope.expanding) >= MAX_EXPANSION:
            raise DefinitionError(f"definitions nest more than {MAX_EXPANSION} deep", span)
        defaults = self.namespace.defaults(name)
        given = self.option_values(name, options, scope, defaults, _bool_flag(defaults), set())
        for key, value in given.items():
            _check_same_kind(name, key, value, defaults[key], options)
        inner = _Scope({**defaults, **given}, (*scope.expanding, name))
        try:
            return self.value(definition.body, inner)
        except OpcompError as error:
            where = f" ({definition.span.where})" if definition.span else ""
            used = f", used at {span.where}" if span else ""
            raise error.with_note(f"in definition '{name}'{where}{used}") from None


def _scale(coefficient: int | float, direction: Expr, span: Span | None) -> Expr:
    """``c * x`` in canonical form: one float factor in front, nested scalings multiplied."""
    if isinstance(direction, Product):
        coefficient = _arithmetic(operator.mul, span, coefficient, direction.factors[0].value)
        direction = direction.factors[1]
    factor = _arithmetic(float, span, _finite(coefficient, span))
    return Product((Num(factor, span), direction), span)


def _finite(number: int | float, span: Span | None) -> int | float:
    try:
        ok = math.isfinite(number)
    except OverflowError:
        ok = False
    if not ok:
        raise _overflow(span)
    return number


def _arithmetic(operation, span: Span | None, *numbers: int | float) -> int | float:
    """``operation(*numbers)``, with Python's overflow (a huge integer times a float) as the user's error."""
    try:
        return operation(*numbers)
    except OverflowError:
        raise _overflow(span) from None


def _overflow(span: Span | None) -> CompositionError:
    return CompositionError("this arithmetic overflows to infinity — use smaller numbers", span)


def _bool_flag(defaults: Mapping[str, Constant]):
    def target(flag: str):
        return (flag, True) if isinstance(defaults.get(flag), bool) else None

    return target


def _kind(value: Constant) -> str:
    if isinstance(value, bool):
        return "true/false"
    return "a word" if isinstance(value, str) else "a number"


def _check_same_kind(owner: str, key: str, value: Constant, default: Constant, options) -> None:
    if _kind(value) != _kind(default):
        option = next((o for o in options if o.name == key), None)
        span = (option.value.span if option and option.value is not None else None) or (option and option.span)
        shown = option_expr(value)
        raise OptionValueError(
            f"option '{key}' of '{owner}' must be {_kind(default)} like its default "
            f"{to_source(option_expr(default))} (got {to_source(shown)})",
            span,
        )


def _unknown_option(owner: str, option: Option, fields, words, *, flag: bool) -> OpcompError:
    if flag and option.name in fields:
        return OptionValueError(
            f"option '{option.name}' of '{owner}' needs a value: write {option.name}=...", option.span
        )
    candidates = [*fields, *(words if flag else ())]
    guess = closest(option.name, candidates)
    if guess:
        hint = f" — did you mean '{guess}'?"
    elif candidates:
        hint = f" — its options are: {', '.join(sorted(fields))}"
    else:
        hint = f" — '{owner}' takes no options"
    return UnknownOptionError(f"unknown option '{option.name}' of '{owner}'{hint}", option.span, suggestion=guess)


def _option_error(spec: OpSpec, error: ValidationError, options: tuple[Option, ...], span) -> OpcompError:
    problem = error.errors()[0]
    key = str(problem["loc"][0]) if problem["loc"] else None
    if key is None:  # a check across options (a model validator)
        reason = str(problem.get("ctx", {}).get("error", problem["msg"]))
        return OptionValueError(f"options of '{spec.name}': {reason}", span)
    option = next((o for o in options if o.name == key), None)
    if option is None:  # a flag set it
        option = next((o for o in options if o.value is None and (spec.flag_target(o.name) or ("",))[0] == key), None)
    where = (option.value.span if option and option.value is not None else None) or (option and option.span) or span
    got = problem.get("input")
    got_text = to_source(option_expr(got)) if isinstance(got, (int, float, bool, str)) else repr(got)
    reason = problem["msg"].replace("Input should be", "must be")
    for pydantic_words, ours in _PLAIN_WORDS.items():
        reason = reason.replace(pydantic_words, ours)
    guess = None
    words = enum_values(spec.option_fields()[key].annotation)
    if words and isinstance(got, str):
        guess = closest(got, words)
    hint = f" — did you mean '{guess}'?" if guess else ""
    return OptionValueError(f"option '{key}' of '{spec.name}' {reason} (got {got_text}){hint}", where, suggestion=guess)


_PLAIN_WORDS = {"a valid integer": "an integer", "a valid boolean": "true or false", "a valid number": "a number"}


def _arity_error(spec: OpSpec, args: tuple[Expr, ...], span) -> OpcompError:
    if spec.arity == 0:
        return ArityError(
            f"'{spec.name}' takes no arguments — write '{spec.name}' (options go in brackets)",
            args[0].span or span,
        )
    wanted = ", ".join(spec.params)
    plural = "s" if spec.arity > 1 else ""
    if len(args) < spec.arity:
        missing = spec.params[len(args)]
        return ArityError(
            f"'{spec.name}' takes {spec.arity} argument{plural} ({wanted}), got {len(args) or 'none'} — "
            f"missing argument '{missing}': write {spec.name}({wanted})",
            span,
        )
    return ArityError(
        f"'{spec.name}' takes {spec.arity} argument{plural} ({wanted}), got {len(args)} — remove the extra one",
        args[spec.arity].span or span,
    )
