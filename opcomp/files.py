"""What a user names on the command line: a text file, or ``MODULE:FUNCTION`` to import and call.

Every failure is an :class:`OpcompError` that names the option and says why, so the ``opcomp``
command answers a mistake with one line and never a traceback: a file that cannot be read, a
module that is not there or raises while it is imported, a relative module name, a function
that needs arguments or raises when called. Modules are looked for in the current directory
first, as ``python -m`` would (a console script's ``sys.path`` does not hold it).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opcomp.errors import OpcompError


def read_text(path: str, option: str) -> str:
    """The UTF-8 text of a file the user named, or an OpcompError that says why not."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise OpcompError(f"cannot read {option} {path}: it is not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise OpcompError(f"cannot read {option} {path}: {error.strerror}") from None


def load_callable(spec: str, option: str, check_arguments: bool = True) -> Callable:
    """MODULE:FUNCTION -> the function, checked to take no arguments (unless not ``check_arguments``:
    a class the caller calls with its own); an OpcompError naming ``option`` and the fix otherwise."""
    module_name, colon, name = spec.partition(":")
    if not colon or not module_name or not name:
        raise OpcompError(f"{option} takes MODULE:FUNCTION, e.g. opcomp.comparison.models:cnn; got {spec!r}")
    if module_name.startswith("."):
        raise OpcompError(f"{option}: {module_name!r} is a relative module name; give it whole, e.g. my_tasks")
    here = os.getcwd()
    added = here not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise OpcompError(f"{option}: cannot import {module_name!r}: {error}") from None
    except Exception as error:  # the module's own code raised while it was imported
        raise OpcompError(f"{option}: importing {module_name!r} raised {_said(error)}") from None
    finally:
        if added:
            sys.path.remove(here)
    function = getattr(module, name, None)
    if not callable(function):
        raise OpcompError(f"{option}: {module_name!r} has no {name!r} to call")
    if not check_arguments:
        return function
    try:
        inspect.signature(function).bind()
    except TypeError:
        raise OpcompError(
            f"{option}: {spec}{inspect.signature(function)} needs arguments; give a function that takes none"
        ) from None
    except ValueError:  # a builtin without a signature: let the call decide
        pass
    return function


def call(spec: str, option: str, function: Callable[..., Any], *args) -> Any:
    """``function(*args)``, a user's code: whatever it raises becomes an OpcompError naming it."""
    try:
        return function(*args)
    except OpcompError as error:
        raise OpcompError(f"{option}: {spec}: {error.message}") from None
    except Exception as error:
        raise OpcompError(f"{option}: {spec} raised {_said(error)}") from None


def _said(error: BaseException) -> str:
    first = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {first[:300]}" if first else type(error).__name__
