"""Real data that ships inside packages: nothing here downloads.

- ``digits``: scikit-learn's 1,797 8×8 handwritten digits (``pip install opcomp[bench]``).
- ``pydoc_text``: the text of Python's own help topics (``pydoc_data.topics``, in the stdlib).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opcomp.errors import OpcompError


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor


def digits(validation: float = 0.2, seed: int = 0) -> tuple[Split, Split]:
    """Images (N, 1, 8, 8) scaled to [0, 1], labels 0–9, split by a seeded permutation."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise OpcompError("the digits task needs scikit-learn: pip install 'opcomp[bench]'") from None
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(len(y) * (1 - validation))
    return Split(x[order[:cut]], y[order[:cut]]), Split(x[order[cut:]], y[order[cut:]])


@dataclass
class Text:
    """A character corpus as token ids, with its alphabet."""

    tokens: torch.Tensor
    alphabet: str

    def windows(self, batch: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random (inputs, next-character targets), each (batch, length)."""
        starts = torch.randint(0, len(self.tokens) - length - 1, (batch,), generator=generator)
        index = starts.unsqueeze(1) + torch.arange(length + 1)
        chunk = self.tokens[index]
        return chunk[:, :-1], chunk[:, 1:]


def pydoc_text(limit: int | None = None) -> Text:
    """Python's help topics as one character stream (about 465,000 characters)."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[key] for key in sorted(topics))
    if limit is not None:
        text = text[:limit]
    alphabet = "".join(sorted(set(text)))
    lookup = {c: i for i, c in enumerate(alphabet)}
    return Text(torch.tensor([lookup[c] for c in text], dtype=torch.long), alphabet)
