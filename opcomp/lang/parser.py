"""Text -> syntax tree, with every syntax error turned into an :class:`OpcompSyntaxError`.

The grammar lives in ``grammar/opcomp.lark``; one LALR parser serves expressions and .opc files.
"""

from __future__ import annotations

from functools import cache

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import (
    LarkError,
    UnexpectedCharacters,
    UnexpectedEOF,
    UnexpectedInput,
    UnexpectedToken,
    VisitError,
)

from opcomp._resources import data_dir
from opcomp.errors import OpcompError, OpcompSyntaxError
from opcomp.lang.ast import Call, Definition, Expr, Fallback, Name, Neg, Num, Option, Product, Sum
from opcomp.lang.source import Source, Span

MAX_NESTING = 64
"""Deepest bracket/unary nesting accepted; far beyond any real optimizer, far below Python's stack."""

MAX_TEXT = 65_536
"""Longest expression or definition file read, in characters: a 1,000-operator expression is 16,000,
and parsing grows with the text (64 KiB reads in well under a second)."""

_OPENERS = {"(": ")", "[": "]"}
_CLOSERS = {")": "(", "]": "["}

# How the parser's terminal names read in a message.
_TERMINALS = {
    "NAME": "a name",
    "NUMBER": "a number",
    "LPAR": "'('",
    "RPAR": "')'",
    "LSQB": "'['",
    "RSQB": "']'",
    "COMMA": "','",
    "EQUAL": "'='",
    "VBAR": "'|'",
    "STAR": "'*'",
    "MINUS": "'-'",
    "ADDOP": "'+' or '-'",
    "$END": "the end",
}


@cache
def _lark() -> Lark:
    grammar = (data_dir("grammar") / "opcomp.lark").read_text(encoding="utf-8")
    return Lark(
        grammar,
        start=["expression", "file"],
        parser="lalr",
        propagate_positions=True,
        maybe_placeholders=False,
    )


def parse(text: str, name: str = "<expr>") -> Expr:
    """Parse one expression, e.g. ``parse("muon(kfac(grad))")``."""
    source = Source(text, name)
    return _run(source, "expression")


def parse_file(text: str, name: str = "<definitions>") -> tuple[Definition, ...]:
    """Parse the definitions of a .opc file (their names are checked later, by the namespace)."""
    source = Source(text, name)
    return _run(source, "file")


def _run(source: Source, start: str):
    if not isinstance(source.text, str):
        raise OpcompSyntaxError(f"expected the expression as a string, got {type(source.text).__name__}")
    if len(source.text) > MAX_TEXT:
        what = "an expression" if start == "expression" else "a definition file"
        raise OpcompSyntaxError(
            f"{source.name} is {len(source.text):,} characters long; opcomp reads {what} of at most "
            f"{MAX_TEXT:,} — split it into definitions (a .opc file) that refer to each other"
        )
    _check_brackets(source)
    try:
        tree = _lark().parse(source.text, start=start)
        return _ToAst(source).transform(tree)
    except UnexpectedInput as error:
        raise _syntax_error(source, error, start) from None
    except VisitError as error:  # raised while building the tree: a number we cannot read
        if isinstance(error.orig_exc, OpcompError):
            raise error.orig_exc from None
        if isinstance(error.orig_exc, RecursionError):
            raise _too_deep(source) from None
        raise OpcompSyntaxError(f"cannot read the expression: {error.orig_exc}") from None
    except RecursionError:
        raise _too_deep(source) from None
    except LarkError as error:  # anything else lark may raise is still the input's fault
        raise OpcompSyntaxError(f"cannot read the expression: {error}") from None


def _too_deep(source: Source) -> OpcompSyntaxError:
    return OpcompSyntaxError(
        "the expression is nested too deeply to read — flatten it (e.g. fewer repeated '-')",
        _span_at(source, 1, 1),
    )


def _span_at(source: Source, line: int, column: int, width: int = 1) -> Span:
    return Span(source, line, column, line, column + width)


def _check_brackets(source: Source) -> None:
    """Report unbalanced brackets at the bracket itself, before the parser guesses elsewhere."""
    stack: list[tuple[str, int, int]] = []
    line, column = 1, 0
    in_comment = False
    for char in source.text:
        column += 1
        if char == "\n":
            line, column, in_comment = line + 1, 0, False
            continue
        if in_comment or char == "#":
            in_comment = True
            continue
        if char in _OPENERS:
            stack.append((char, line, column))
            if len(stack) > MAX_NESTING:
                raise OpcompSyntaxError(f"brackets nested more than {MAX_NESTING} deep", _span_at(source, line, column))
        elif char in _CLOSERS:
            if not stack:
                raise OpcompSyntaxError(
                    f"unbalanced bracket: '{char}' closes nothing — remove it or add the '{_CLOSERS[char]}' it closes",
                    _span_at(source, line, column),
                )
            opener, open_line, open_column = stack.pop()
            if _OPENERS[opener] != char:
                raise OpcompSyntaxError(
                    f"unbalanced bracket: '{char}' does not match '{opener}' opened at "
                    f"{open_line}:{open_column} — expected '{_OPENERS[opener]}'",
                    _span_at(source, line, column),
                )
    if stack:
        opener, open_line, open_column = stack[-1]
        raise OpcompSyntaxError(
            f"unbalanced bracket: '{opener}' is never closed — add '{_OPENERS[opener]}'",
            _span_at(source, open_line, open_column),
        )


def bracket_depth(text: str) -> int:
    """The deepest nesting of '(' and '[' in ``text`` (text without comments, such as canonical text)."""
    depth = deepest = 0
    for char in text:
        if char in _OPENERS:
            depth += 1
            deepest = max(deepest, depth)
        elif char in _CLOSERS:
            depth -= 1
    return deepest


def _syntax_error(source: Source, error: UnexpectedInput, start: str) -> OpcompSyntaxError:
    line = max(1, getattr(error, "line", 1) or 1)
    column = max(1, getattr(error, "column", 1) or 1)
    if isinstance(error, UnexpectedCharacters):
        char = source.text[error.pos_in_stream] if 0 <= error.pos_in_stream < len(source.text) else "?"
        return OpcompSyntaxError(
            f"unexpected character {char!r}: expressions use names, numbers, brackets, ',', '=', '+', '-', '*' and '|'",
            _span_at(source, line, column),
        )
    if isinstance(error, UnexpectedEOF) or (isinstance(error, UnexpectedToken) and error.token.type == "$END"):
        line, column = _end_position(source)
        expected = _describe(getattr(error, "expected", ()) or ())
        what = "an expression" if start == "expression" else "a definition"
        message = f"{what} ends too early: expected {expected}" if expected else f"{what} ends too early"
        if not source.text.strip():
            message = "empty expression: write an operator such as 'adamw' or 'muon(g) | adamw(g)'"
        return OpcompSyntaxError(message, _span_at(source, line, column))
    assert isinstance(error, UnexpectedToken)
    token: Token = error.token
    width = max(1, len(str(token)))
    expected = set(error.expected or ())
    if "$END" in expected and start == "expression":
        return OpcompSyntaxError(
            f"unexpected {str(token)!r} after a complete expression — join the parts with '+', '*' or '|', "
            "or remove it",
            _span_at(source, line, column, width),
        )
    return OpcompSyntaxError(
        f"unexpected {str(token)!r}: expected {_describe(expected)}",
        _span_at(source, line, column, width),
    )


def _describe(expected) -> str:
    names = sorted({_TERMINALS.get(t, t.lower()) for t in expected})
    if not names:
        return "something else"
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _end_position(source: Source) -> tuple[int, int]:
    lines = source.text.splitlines() or [""]
    return len(lines), len(lines[-1]) + 1


@v_args(meta=True)
class _ToAst(Transformer):
    """Lark tree -> frozen AST, stamping every node with its span."""

    def __init__(self, source: Source) -> None:
        super().__init__()
        self.source = source

    def _span(self, meta) -> Span | None:
        if getattr(meta, "empty", True):
            return None
        return Span(self.source, meta.line, meta.column, meta.end_line, meta.end_column)

    def _token_span(self, token: Token) -> Span:
        return Span(self.source, token.line, token.column, token.end_line, token.end_column)

    def expression(self, meta, items):
        return items[0]

    def file(self, meta, items):
        return tuple(items)

    def definition(self, meta, items):
        name, *rest = items
        params = rest[0] if len(rest) == 2 else ()
        return Definition(str(name), params, rest[-1], self._span(meta))

    def params(self, meta, items):
        return tuple(items)

    def param(self, meta, items):
        name, value = items
        return Option(str(name), value, self._token_span(name))

    def number(self, meta, items):
        (token,) = items
        text = str(token)
        try:
            value: int | float = int(text) if text.isdigit() else float(text)
        except (ValueError, OverflowError):
            raise OpcompSyntaxError(f"cannot read the number {text!r}", self._token_span(token)) from None
        if isinstance(value, float) and value in (float("inf"), float("-inf")):
            raise OpcompSyntaxError(f"the number {text} is too large", self._token_span(token))
        return Num(value, self._token_span(token))

    def name(self, meta, items):
        (token,) = items
        return Name(str(token), self._token_span(token))

    def neg(self, meta, items):
        (operand,) = items
        span = self._span(meta)
        if isinstance(operand, Num):
            return Num(-operand.value, span)
        return Neg(operand, span)

    def product(self, meta, items):
        return Product(tuple(items), self._span(meta))

    def sum(self, meta, items):
        return Sum(tuple(items[0::2]), tuple(str(op) for op in items[1::2]), self._span(meta))

    def fallback(self, meta, items):
        return Fallback(tuple(items), self._span(meta))

    def call(self, meta, items):
        name, *rest = items
        options: tuple[Option, ...] = ()
        args: tuple[Expr, ...] = ()
        for part in rest:
            if part and isinstance(part[0], Option):
                options = part
            else:
                args = part
        return Call(str(name), options, args, self._token_span(name))

    def options(self, meta, items):
        return tuple(items)

    def option(self, meta, items):
        name = items[0]
        value = items[1] if len(items) > 1 else None
        return Option(str(name), value, self._token_span(name))

    def args(self, meta, items):
        return tuple(items)
