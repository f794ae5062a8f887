"""The one error hierarchy of opcomp.

Every error is written for a person: it says what is wrong, shows the source line with a caret
under the column it is about, and, where it can, suggests the fix. No input string may raise
anything but an :class:`OpcompError`.
"""

from __future__ import annotations

import difflib
import sys
import warnings
from collections.abc import Iterable

from opcomp.lang.source import Span


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate a misspelt ``word`` most likely meant, or None."""
    matches = difflib.get_close_matches(word, sorted(set(candidates)), n=1, cutoff=0.6)
    return matches[0] if matches else None


class OpcompError(Exception):
    """Base of every error opcomp raises about what a user wrote or asked for.

    ``message`` says what is wrong; ``span`` is where; ``suggestion`` is the likely intended name
    (also spelled out in the message); ``notes`` add context such as the definition being expanded.
    """

    def __init__(
        self,
        message: str,
        span: Span | None = None,
        *,
        suggestion: str | None = None,
        notes: Iterable[str] = (),
    ) -> None:
        self.message = message
        self.span = span
        self.suggestion = suggestion
        self.notes = tuple(notes)
        super().__init__(self.render())

    @property
    def line(self) -> int | None:
        return self.span.line if self.span else None

    @property
    def column(self) -> int | None:
        return self.span.column if self.span else None

    def with_note(self, note: str) -> OpcompError:
        """Add context while the error travels outwards; returns self for ``raise``."""
        self.notes = (*self.notes, note)
        self.args = (self.render(),)
        return self

    def render(self) -> str:
        parts = [self.message]
        span = self.span
        if span is not None and span.source is not None:
            text = span.source.line(span.line)
            width = span.end_column - span.column if span.end_line == span.line else len(text) - span.column + 1
            width = max(1, width)
            parts.append(f"  --> {span.where}")
            parts.append(f"  {text}")
            parts.append("  " + " " * (span.column - 1) + "^" * width)
        parts.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.render()


class OpcompWarning(UserWarning):
    """The build or a step does something other than what was written, and says so (once)."""


class OpcompNotice(UserWarning):
    """A step about to take a while for a reason worth one line (compiling), not a departure from
    what was written; ``warnings.filterwarnings("ignore", category=opcomp.OpcompNotice)`` hides it."""


def warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` pointed at the user's line: the first caller outside opcomp and torch,
    however deep inside them the warning was found."""
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_globals.get("__name__", "").partition(".")[0] in ("opcomp", "torch"):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


class OpcompTypeError(OpcompError, TypeError):
    """An argument of the wrong type (what Python code catches as TypeError)."""


class OpcompValueError(OpcompError, ValueError):
    """An argument of the right type and a wrong value (what Python code catches as ValueError)."""


class OpcompSyntaxError(OpcompError):
    """The text is not a well-formed expression or definition file."""


class UnknownNameError(OpcompError):
    """A name that is neither an operator, an alias, a definition nor a bound option."""


class UnknownOptionError(OpcompError):
    """An option the operator or definition does not have."""


class OptionValueError(OpcompError):
    """An option value of the wrong type or outside its bounds."""


class ArityError(OpcompError):
    """An operator called with the wrong number of arguments."""


class DefinitionError(OpcompError):
    """A definition that shadows an operator, repeats a name, or refers to itself."""


class CompositionError(OpcompError):
    """A well-formed expression whose parts do not fit together.

    Arithmetic mixing numbers and directions, a fallback branch that can never be used,
    gradient-rebinding probes nested inside each other.
    """
