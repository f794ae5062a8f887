"""Fuzzing the language: characters, tokens and mutated valid expressions, huge numbers, deep
nesting and exploding definition files raise nothing but an OpcompError, each quickly, and every
canonical text parses again to itself."""

from __future__ import annotations

import re
import time

from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import canonical_exprs

import opcomp
from opcomp.lang.parser import MAX_NESTING

CPU_SECONDS = 3.0
"""Per input, far above what a real expression costs (a 1,000-operator one lowers in 0.1 s)."""

HUGE = ["1" + "0" * 400, "1e400", "0." + "0" * 400 + "1", "9" * 30, "1e-400", "123456789.123456789e300"]
TOKENS = [
    *sorted(opcomp.REGISTRY.names()),
    *opcomp.presets().names(),
    *HUGE,
    "0.5",
    "1",
    "0",
    "-",
    "+",
    "*",
    "|",
    "(",
    ")",
    "[",
    "]",
    ",",
    "=",
    "true",
    "false",
    "fisher",
    "mc",
    "rho",
    "beta",
    "x",
    "#",
    "\n",
]
_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d*)?(?:e[+-]?\d+)?|\S")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


@st.composite
def mutated(draw) -> str:
    """A valid expression (a preset's definition or a drawn canonical tree) with tokens deleted,
    duplicated, swapped, replaced or wrapped in deep nesting."""
    source = draw(
        st.one_of(
            st.sampled_from(opcomp.presets().names()).map(opcomp.format),
            canonical_exprs(depth=2).map(opcomp.format),
        )
    )
    parts = tokens(source)
    for _ in range(draw(st.integers(1, 4))):
        if not parts:
            break
        i = draw(st.integers(0, len(parts) - 1))
        j = draw(st.integers(0, len(parts) - 1))
        how = draw(st.sampled_from(["delete", "duplicate", "swap", "replace", "nest", "huge"]))
        if how == "delete":
            del parts[i]
        elif how == "duplicate":
            parts.insert(i, parts[i])
        elif how == "swap":
            parts[i], parts[j] = parts[j], parts[i]
        elif how == "replace":
            parts[i] = draw(st.sampled_from(TOKENS))
        elif how == "huge":
            parts[i] = draw(st.sampled_from(HUGE))
        else:
            depth = draw(st.integers(MAX_NESTING - 2, MAX_NESTING + 2))
            wrapper = draw(st.sampled_from(["sign(", "(", "-(", "0.5 * ("]))
            parts = [wrapper * depth, *parts, ")" * depth]
    return " ".join(parts)


texts = st.one_of(
    st.text(max_size=200),  # characters
    st.text(alphabet="adgkmprsuow_fl()[]=,|+-*.0123456789e \n#", max_size=80),
    st.lists(st.sampled_from(TOKENS), max_size=25).map(" ".join),  # tokens
    mutated(),  # mutations of valid expressions
)


def within_budget(run, *args):
    """``run(*args)``: an OpcompError or a result, never another exception, within the CPU budget."""
    start = time.process_time()
    try:
        return run(*args)
    except opcomp.OpcompError as error:
        assert error.message
        return None
    finally:
        assert time.process_time() - start < CPU_SECONDS, args


@settings(max_examples=400)
@given(texts)
def test_any_text_raises_only_opcomp_errors_quickly_and_canonical_text_reparses(text):
    within_budget(opcomp.parse, text)
    canonical = within_budget(opcomp.format, text)
    if canonical is not None:
        assert opcomp.format(canonical) == canonical
        assert opcomp.parse(canonical) == opcomp.lower(text).expr


@st.composite
def definition_files(draw) -> str:
    """Definition files that chain, double, nest or break: each line may use the ones above it."""
    lines = ["a0 = " + draw(st.sampled_from(["adamw", "g", "muon(g) | adamw", "sign(" * 30 + "g" + ")" * 30]))]
    for i in range(1, draw(st.integers(1, 30))):
        body = draw(
            st.sampled_from(
                [
                    "a{p} + a{p}",
                    "sign(sign(a{p}))",
                    "0.5 * a{p} - a{p}",
                    "muon(a{p}) | a{p}",
                    "1" + "0" * 310 + " * a{p}",
                    "a{p} + (a{p}",
                    "a{i}",
                ]
            )
        )
        lines.append(f"a{i} = " + body.format(p=i - 1, i=i))
    return "\n".join(draw(st.permutations(lines)) if draw(st.booleans()) else lines)


@settings(max_examples=40)
@given(definition_files())
def test_definition_files_that_explode_or_break_raise_only_opcomp_errors_quickly(text):
    namespace = within_budget(opcomp.parse_definitions, text)
    if namespace is None:
        return
    for name in namespace.names():
        if not name.startswith("a"):
            continue
        canonical = within_budget(opcomp.format, name, namespace)
        if canonical is not None:
            assert opcomp.format(canonical) == canonical


def test_the_pinned_escapes_are_opcomp_errors():
    huge = "1" + "0" * 309
    for text in (f"0.5 * {huge} * g", f"adamw[eps=0.5 * {huge}]", f"adamw[eps=1e308 + {huge}]", f"-{huge}.5 * g"):
        within_budget(opcomp.lower, text)
    doubling = "\n".join(["a0 = adamw", *(f"a{i} = a{i - 1} + a{i - 1}" for i in range(1, 21))])
    namespace = opcomp.parse_definitions(doubling)
    start = time.process_time()
    try:
        opcomp.lower("a20", namespace)
        raise AssertionError("a definition file that doubles twenty times was accepted")
    except opcomp.DefinitionError as error:
        assert "expands to more than" in error.message
    assert time.process_time() - start < CPU_SECONDS


def test_text_longer_than_the_parser_reads_is_refused_at_once():
    start = time.process_time()
    for reader in (opcomp.parse, opcomp.parse_definitions):
        try:
            reader("adamw + " * 130_000 + "g")  # about 1 MB
            raise AssertionError("a 1 MB text was read")
        except opcomp.OpcompSyntaxError as error:
            assert "characters long" in error.message
    assert time.process_time() - start < 0.5


def test_canonical_text_deeper_than_the_parser_reads_is_refused():
    deep = "sign(" * 40 + "g" + ")" * 40
    namespace = opcomp.parse_definitions(f"d = {deep}\n")
    assert opcomp.parse(opcomp.format("sign(" * 20 + "d" + ")" * 20, namespace))  # 60 deep: fine
    try:
        opcomp.format("sign(" * 30 + "d" + ")" * 30, namespace)
        raise AssertionError("canonical text 70 brackets deep was printed")
    except opcomp.CompositionError as error:
        assert "nests brackets 70 deep" in error.message
