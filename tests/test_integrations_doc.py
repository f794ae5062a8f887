"""docs/integrations.md promises that its snippets run as written: each Python block, on its own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PAGE = Path(__file__).parents[1] / "docs" / "integrations.md"
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)


def heading_of(block: str) -> str:
    """The section a block sits in, for the test's id."""
    text = PAGE.read_text(encoding="utf-8")
    before = text[: text.index(block)]
    return re.findall(r"^## (.+)$", before, flags=re.M)[-1]


def test_the_page_has_a_snippet_for_each_integration():
    sections = {heading_of(block) for block in BLOCKS}
    for needed in ("Hugging Face `Trainer`", "Lightning", "Gradient accumulation", "Mixed precision",
                   "torch.compile", "Gradient checkpointing", "Clipping"):  # fmt: skip
        assert needed in sections, needed


@pytest.mark.parametrize("block", BLOCKS, ids=[f"{i}-{heading_of(b)}" for i, b in enumerate(BLOCKS)])
def test_snippet_runs(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Lightning and the Trainer write next to the working directory
    exec(compile(block, str(PAGE), "exec"), {"__name__": "snippet"})
