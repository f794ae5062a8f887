"""Source text and positions, so every error can point at the place it is about."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, eq=False)
class Source:
    """A piece of text the user wrote: an expression string or a definition file."""

    text: str
    name: str = "<expr>"

    def line(self, number: int) -> str:
        """The 1-based line ``number`` of the text, without its newline."""
        lines = self.text.splitlines() or [""]
        if 1 <= number <= len(lines):
            return lines[number - 1]
        return ""


@dataclass(frozen=True)
class Span:
    """Where a node came from: 1-based line and column, end exclusive."""

    source: Source | None
    line: int
    column: int
    end_line: int
    end_column: int

    @property
    def where(self) -> str:
        name = self.source.name if self.source is not None else "<expr>"
        return f"{name}:{self.line}:{self.column}"
