"""Counting reads of tensor values on the host: each is a wait for the device on an accelerator.

A CUDA-free count: every way Python turns a tensor into a host value (``item``, ``bool``, ``int``,
``float``, ``tolist``) is wrapped while the context is open.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

READS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist")


@contextmanager
def counted_reads() -> Iterator[list[str]]:
    """The names of the reads made inside, in order."""
    seen: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        for name in READS:
            original = getattr(torch.Tensor, name)

            def counting(self, *args, _name=name, _original=original, **kwargs):
                seen.append(_name)
                return _original(self, *args, **kwargs)

            patch.setattr(torch.Tensor, name, counting)
        yield seen
