"""Definitions from .opc files and the namespaces that hold them, presets included.

A definition ``name[opt=default, ...] = body`` names an expression; its options are constants
that the body uses as numbers (``(1 - lam) * kfac``) or as option values (``sam[rho=rho]``).
Definitions never shadow an operator or each other, so a name means one thing everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from types import MappingProxyType

from opcomp._resources import data_dir
from opcomp.errors import DefinitionError
from opcomp.lang.ast import Definition, Name, Num
from opcomp.lang.parser import parse_file
from opcomp.ops import REGISTRY

Constant = int | float | bool | str


def constant(value) -> Constant | None:
    """The constant an option default is written as (number, true/false, word), else None."""
    if isinstance(value, Num):
        return value.value
    if isinstance(value, Name):
        return {"true": True, "false": False}.get(value.name, value.name)
    return None


@dataclass(frozen=True)
class Note:
    """What the comment block right above a definition says: prose, and ``key: value`` lines."""

    text: str = ""
    fields: Mapping[str, str] = field(default_factory=dict)

    @property
    def lr(self) -> float | None:
        value = self.fields.get("lr")
        return float(value) if value is not None else None

    def lr_for(self, kind: str) -> float | None:
        """The ``# lr_<kind>:`` rate where the note has one (``# lr_transformer: 0.003``), else ``# lr:``."""
        value = self.fields.get(f"lr_{kind}")
        return float(value) if value is not None else self.lr


def note_above(source: str, line: int) -> Note:
    """The contiguous '#' comment lines ending right above 1-based ``line``."""
    lines = source.splitlines()
    block: list[str] = []
    index = line - 2
    while index >= 0 and lines[index].lstrip().startswith("#"):
        block.insert(0, lines[index].lstrip()[1:].strip())
        index -= 1
    fields, prose = {}, []
    for entry in block:
        key, colon, value = entry.partition(":")
        if colon and key.strip().isidentifier() and key.strip() in NOTE_FIELDS:
            fields[key.strip()] = value.strip()
        else:
            prose.append(entry)
    return Note(" ".join(prose).strip(), MappingProxyType(fields))


RATE_FIELDS = ("lr", "lr_transformer", "lr_large_cnn")  # lr_<kind> for each kind of learning_rates.model_kind
NOTE_FIELDS = (*RATE_FIELDS, "seed")


@dataclass(frozen=True)
class Namespace:
    """Name -> definition. Build one with :meth:`load` or use :func:`presets`."""

    definitions: Mapping[str, Definition]
    notes: Mapping[str, Note] = field(default_factory=dict)

    def note(self, name: str) -> Note:
        return self.notes.get(name, Note())

    def get(self, name: str) -> Definition | None:
        return self.definitions.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self.definitions

    def names(self) -> list[str]:
        return sorted(self.definitions)

    def defaults(self, name: str) -> dict[str, Constant]:
        """The option defaults of definition ``name``."""
        return {p.name: constant(p.value) for p in self.definitions[name].params}

    def extend(self, definitions: Iterable[Definition], notes: Mapping[str, Note] | None = None) -> Namespace:
        """This namespace plus ``definitions``, checked: no operator names, no repeats."""
        table = dict(self.definitions)
        for definition in definitions:
            _check(definition, table)
            table[definition.name] = definition
        return Namespace(MappingProxyType(table), MappingProxyType({**self.notes, **(notes or {})}))

    def load(self, text: str, name: str = "<definitions>") -> Namespace:
        """This namespace plus the definitions in the .opc ``text`` (``name`` labels errors)."""
        definitions = parse_file(text, name)
        notes = {d.name: note_above(text, d.span.line) for d in definitions if d.span is not None}
        for definition in definitions:
            _check_note(definition, notes.get(definition.name, Note()))
        return self.extend(definitions, notes)


EMPTY = Namespace(MappingProxyType({}))


def _check_note(definition: Definition, note: Note) -> None:
    """A ``# lr:`` (or ``# lr_transformer:``, ``# lr_large_cnn:``) line is a recommended learning
    rate: a positive number, said where it is written."""
    for key in RATE_FIELDS:
        value = note.fields.get(key)
        if value is None:
            continue
        try:
            lr = float(value)
        except ValueError:
            lr = math.nan
        if not (math.isfinite(lr) and lr > 0):
            raise DefinitionError(
                f"'# {key}: {value}' above '{definition.name}' is not a learning rate: write one positive number, "
                f"e.g. '# {key}: 0.03' (a comment of its own goes on another line)",
                definition.span,
            )


def _check(definition: Definition, table: Mapping[str, Definition]) -> None:
    name = definition.name
    if REGISTRY.get(name) is not None or name in REGISTRY.specs:
        raise DefinitionError(
            f"'{name}' is an operator; a definition cannot shadow it — choose another name",
            definition.span,
        )
    if name in table:
        earlier = table[name].span
        where = f" (first defined at {earlier.where})" if earlier else ""
        raise DefinitionError(f"'{name}' is defined twice{where} — rename one", definition.span)
    seen: set[str] = set()
    for param in definition.params:
        if param.name in seen:
            raise DefinitionError(f"option '{param.name}' of '{name}' is listed twice", param.span)
        seen.add(param.name)
        if constant(param.value) is None:
            raise DefinitionError(
                f"the default of option '{param.name}' of '{name}' must be a number, true/false or a word",
                param.value.span or param.span,
            )


@cache
def presets() -> Namespace:
    """The presets that ship with opcomp (presets/*.opc), as one namespace."""
    namespace = EMPTY
    for path in sorted(data_dir("presets").glob("*.opc")):
        namespace = namespace.load(path.read_text(encoding="utf-8"), f"presets/{path.name}")
    return namespace


def parse_definitions(text: str, name: str = "<definitions>", *, with_presets: bool = True) -> Namespace:
    """Definitions from .opc ``text``, on top of the presets unless ``with_presets=False``."""
    return (presets() if with_presets else EMPTY).load(text, name)
