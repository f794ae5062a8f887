"""The model's prediction inside what its forward returns.

Monte Carlo labels are sampled from the prediction, and Gauss–Newton products differentiate the
loss at it. Plain models return it as a tensor; Hugging Face models return a ``ModelOutput`` (a
dict that also holds the loss, caches, hidden states), where it is ``logits``. ``output`` names the
key or attribute to read, or is a function of the forward's return value for anything else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from opcomp.errors import OpcompError

Output = str | Callable[[Any], Tensor]


@dataclass(frozen=True)
class Prediction:
    """Reads the prediction tensor out of a forward's return value (``output``: a key or
    attribute, "logits" by default, or a function)."""

    output: Output = "logits"

    def __post_init__(self) -> None:
        if not (isinstance(self.output, str) or callable(self.output)):
            raise OpcompError(
                f"output names where the model's prediction is in what its forward returns: a key such as "
                f"'logits', or a function of the return value; got {self.output!r}"
            )

    def __call__(self, returned: Any) -> Tensor:
        if isinstance(returned, Tensor):
            return returned
        if callable(self.output):
            value = self.output(returned)
        elif isinstance(returned, Mapping) and self.output in returned:
            value = returned[self.output]
        else:
            value = getattr(returned, self.output, None)
        if not isinstance(value, Tensor):
            keys = f" with keys {list(returned.keys())}" if isinstance(returned, Mapping) else ""
            raise OpcompError(
                f"opcomp needs the model's prediction, but the model returned a {type(returned).__name__}{keys} "
                f"and output={self.output!r} does not name a tensor in it: build with output='<key>' or "
                "output=lambda returned: returned[0]"
            )
        return value

    def found(self, returned: Any) -> Tensor | None:
        """The prediction, or None where there is none to read (the error waits for a use)."""
        try:
            return self(returned)
        except OpcompError:
            return None
