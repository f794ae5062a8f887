"""The README's two commands: one sets up and runs opcomp, the other is exactly what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def readme_commands() -> list[str]:
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    setup, tests = readme_commands()
    assert "pip install torch==2.13.0" in setup and "opcomp " in setup
    assert "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert tests in ci.splitlines()
