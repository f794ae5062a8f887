"""Everything a CUDA device should be asked, in one command and one markdown file.

    python -m opcomp.bench.gpu_check [--out gpu_check.md] [--budget 480]

Run from the repository's root on a machine with a CUDA device. In order, each part under its own
share of ``--budget`` seconds (a part that runs out says so in its row and the rest still run):

1. the device and torch;
2. ``pytest -m cuda`` (tests/test_cuda.py: torch's fused AdamW against opcomp's adamw, the step
   decided on the device against the host-decided one over NaN steps, host synchronisations
   counted by CUDA's sync debug mode, DCP resume, compiled steps), one row per test;
3. host synchronisations per step (after the first) for adamw, muon_adamw, fog and fog_amortized,
   as CUDA's debug mode counts them (:func:`host_syncs`);
4. ``python -m opcomp.bench.step --shapes gpt2 --device cuda`` and ``python -m opcomp.bench.kfac
   --device cuda`` on the MLP, the transformer and the plain CNN, their tables as they print them.

Without a CUDA device it says so and exits with status 2, writing nothing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

BENCHES = (
    ("step, GPT-2 small shapes", ["opcomp.bench.step", "--shapes", "gpt2", "--expr", "adamw(g)", "muon(g)"]),
    ("kfac, MLP", ["opcomp.bench.kfac", "--model", "mlp"]),
    ("kfac, transformer", ["opcomp.bench.kfac", "--model", "transformer"]),
    ("kfac, plain CNN", ["opcomp.bench.kfac", "--model", "cnn"]),
)
SYNC_EXPRESSIONS = ("adamw", "muon_adamw", "fog", "fog_amortized")


def host_syncs(expression: str, model: nn.Module, loss: Callable[[nn.Module], torch.Tensor], steps: int = 6):
    """Host synchronisations in each of ``steps - 1`` steps after the first (which creates the state),
    as ``torch.cuda.set_sync_debug_mode("warn")`` reports them during ``opt.step()`` alone."""
    import opcomp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = opcomp.build(expression, model, lr=0.01)
    counts = []
    for number in range(steps):
        opt.zero_grad()
        loss(model).backward()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        if number:
            counts.append(sum("synchroniz" in str(w.message) for w in caught))
    return counts


def sync_rows() -> list[str]:
    from opcomp.comparison import models

    torch.manual_seed(0)
    x, y = torch.randn(256, 784, device="cuda"), torch.randint(0, 10, (256,), device="cuda")
    rows = []
    for expression in SYNC_EXPRESSIONS:
        model = models.mlp(784, 512, 10).cuda()
        counts = host_syncs(expression, model, lambda m: nn.functional.cross_entropy(m(x), y))
        rows.append(f"| {expression} | {', '.join(map(str, counts))} |")
    return ["| expression | host syncs in steps 2–6 (MLP 784-512-512-10) |", "| --- | --- |", *rows]


def pytest_rows(timeout: float) -> list[str]:
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
        try:
            subprocess.run(command, timeout=timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return [f"pytest -m cuda ran past its {timeout:.0f} s"]
        if not report.exists():
            return ["pytest -m cuda wrote no report: run from the repository's root (tests/ is needed)"]
        rows = ["| test | outcome | seconds |", "| --- | --- | --- |"]
        for case in ElementTree.parse(report).getroot().iter("testcase"):
            outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
            message = next((child.get("message", "") for child in case if child.tag != "system-out"), "")
            detail = f" ({message.splitlines()[0][:120]})" if message and outcome != "passed" else ""
            rows.append(f"| {case.get('name')} | {outcome}{detail} | {float(case.get('time', 0)):.1f} |")
        return rows


def bench_lines(module_and_arguments: list[str], timeout: float) -> list[str]:
    command = [sys.executable, "-m", *module_and_arguments, "--device", "cuda"]
    try:
        done = subprocess.run(command, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return [f"`{' '.join(command[2:])}` ran past its {timeout:.0f} s"]
    if done.returncode:
        return [f"`{' '.join(command[2:])}` failed ({done.returncode}):", "", "```", done.stderr[-2000:], "```"]
    return done.stdout.strip().splitlines()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check.md")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: this machine has no CUDA device; run it where `torch.cuda.is_available()` is true")
        return 2
    start = time.monotonic()

    def left(share: float) -> float:
        return max(30.0, (args.budget - (time.monotonic() - start)) * share)

    lines = [
        "# GPU check",
        "",
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}.",
        "",
        "## Tests marked cuda",
        "",
        *pytest_rows(left(0.35)),
        "",
        "## Host synchronisations per step",
        "",
        *sync_rows(),
    ]
    for index, (title, arguments) in enumerate(BENCHES):
        lines += ["", f"## {title}", "", *bench_lines(arguments, left(1 / (len(BENCHES) - index)))]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)
    print(f"gpu_check: {time.monotonic() - start:.0f} s; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
