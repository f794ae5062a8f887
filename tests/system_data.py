"""Optional data from Debian packages: a test that needs it skips, naming the install command, on a
machine without it — and fails instead where CI asks for everything (OPCOMP_REQUIRE_SYSTEM_DATA=1)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from opcomp.comparison import data

PRESENT = {
    "dataset-fashion-mnist": lambda: (Path(data.FASHION) / "train-images-idx3-ubyte.gz").exists(),
    "bible-kjv": lambda: shutil.which("bible") is not None,
}


def require(package: str) -> None:
    """Skip (or, in CI, fail) the calling test unless Debian's ``package`` is installed."""
    if PRESENT[package]():
        return
    reason = f"needs Debian's {package}: sudo apt-get install {package}"
    if os.environ.get("OPCOMP_REQUIRE_SYSTEM_DATA") == "1":
        pytest.fail(reason + " (OPCOMP_REQUIRE_SYSTEM_DATA=1 makes this a failure)")
    pytest.skip(reason)
