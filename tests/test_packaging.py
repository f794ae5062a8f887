"""The wheel carries grammar/ and presets/: parsing and presets work from an install outside the repo."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

CHECK = """
import pathlib, opcomp
from opcomp._resources import data_dir
site = pathlib.Path({site!r})
assert pathlib.Path(opcomp.__file__).is_relative_to(site), opcomp.__file__
assert data_dir("grammar").is_relative_to(site) and data_dir("presets").is_relative_to(site)
print(opcomp.format("muon(kfac(grad))"))
print(opcomp.format("fog"))
"""


@pytest.mark.slow
def test_wheel_works_outside_the_repository(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("opcomp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "opcomp/_data/grammar/opcomp.lark" in names
    assert "opcomp/_data/presets/fog.opc" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run(
        [sys.executable, "-c", CHECK.format(site=str(site))], cwd=outside, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    canonical = "muon[beta=0.95, coefficients=jordan, gram=false, hidden=false, nesterov=true, steps=5](kfac["
    assert run.stdout.splitlines()[0].startswith(canonical)
    assert " | 0.1 * adamw[" in run.stdout.splitlines()[1]


def test_the_package_runs_no_code_from_data_it_reads():
    """opcomp unpickles nothing and evaluates no text: no import of pickle-like modules, no call of
    eval, exec or torch.load anywhere in the package (DCP's metadata is torch's own pickle,
    documented in opcomp.integrations.dcp and docs/distributed.md as a checkpoint to trust)."""
    import ast
    from pathlib import Path

    import opcomp

    unpicklers = {"pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}
    found = []
    for path in Path(opcomp.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                names = [node.func.id] if node.func.id in ("eval", "exec") else []
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                names = [ast.unparse(node.func)] if ast.unparse(node.func) == "torch.load" else []
            else:
                names = []
            found += [
                f"{path.name}:{node.lineno}: {name}"
                for name in names
                if name in unpicklers | {"eval", "exec", "torch.load"}
            ]
    assert found == [], found
