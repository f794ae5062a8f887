"""Find the grammar/ and presets/ folders, in a source checkout or inside an installed wheel.

In the repository both folders sit at the top level, beside the package; the wheel carries them
as ``opcomp/_data/grammar`` and ``opcomp/_data/presets`` (see pyproject.toml).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


@cache
def data_dir(name: str) -> Path:
    """The folder ``name`` ('grammar' or 'presets') that ships with this copy of opcomp."""
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"opcomp's {name}/ folder is missing: looked in {_PACKAGE / '_data' / name} and "
        f"{_PACKAGE.parent / name}; reinstall the package (pip install opcomp)"
    )
