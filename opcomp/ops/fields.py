"""Option types shared by the operator families, with the bounds pydantic checks."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
"""An EMA decay in [0, 1)."""

Positive = Annotated[float, Field(gt=0.0)]
NonNegative = Annotated[float, Field(ge=0.0)]

Count = Annotated[int, Field(ge=1, le=100_000)]
"""A number of iterations or steps, at least 1."""

Size = Annotated[int, Field(ge=0, le=100_000)]
"""A size that may be switched off with 0 (a block size)."""
