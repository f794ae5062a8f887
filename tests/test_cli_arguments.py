"""The command line answers every bad argument with one line on stderr (and, for a mistake inside a
source text, the caret lines under it) and exit status 2, never a traceback, before anything
trains. docs/cli.md's table lists these cases and their lines."""

from __future__ import annotations

import textwrap

import pytest

from opcomp.cli import main

MODULES = {
    "raises_at_import": "raise RuntimeError('broken on purpose')\n",
    "bad_tasks": textwrap.dedent(
        """
        import torch
        from torch import nn
        from opcomp.comparison.tasks import Task

        def data():
            return torch.randn(8, 3), torch.randint(0, 2, (8,))

        def raises():
            raise ValueError("no data here")

        def metric():
            return Task("t", lambda: nn.Linear(3, 2), lambda g: data(), data(), metric="f1")

        def model_int():
            return Task("t", lambda: 5, lambda g: data(), data())

        def batch_str():
            return Task("t", lambda: nn.Linear(3, 2), lambda g: "batch", data())

        def validation_word():
            return Task("t", lambda: nn.Linear(3, 2), lambda g: data(), "nope")

        def validation_empty():
            return Task("t", lambda: nn.Linear(3, 2), lambda g: data(), (torch.zeros(0, 3), torch.zeros(0)))

        def factory_raises():
            def broken():
                raise KeyError("weights")
            return Task("t", broken, lambda g: data(), data())
        """
    ),
    "deep_rules.toml": "x = " + "[" * 5000 + "]" * 5000 + "\n",  # deeper than any stack: always refused alike
    "bad_lr.opc": "# lr: abc\nmine = adamw\n",
}

CASES = [
    (["compare", "adamw", "--task", "raises_at_import:task"], "importing 'raises_at_import' raised RuntimeError"),
    (["compare", "adamw", "--task", "..x:f"], "relative module name"),
    (["compare", "adamw", "--task", "bad_tasks:raises"], "raised ValueError: no data here"),
    (["compare", "adamw", "--task", "bad_tasks:metric"], "metric must be one of accuracy, perplexity, loss"),
    (["compare", "adamw", "--task", "bad_tasks:model_int"], "model() returned a int, not a torch.nn.Module"),
    (["compare", "adamw", "--task", "bad_tasks:batch_str"], "batch(generator) returned str"),
    (["compare", "adamw", "--task", "bad_tasks:validation_word"], "validation is str"),
    (["compare", "adamw", "--task", "bad_tasks:validation_empty"], "0 inputs and 0 targets"),
    (["compare", "adamw", "--task", "bad_tasks:factory_raises"], "model() raised KeyError"),
    (["explain", "fog", "--model", "raises_at_import:model"], "importing 'raises_at_import' raised"),
    (["explain", "fog", "--model", "bad_tasks:raises"], "raised ValueError: no data here"),
    (["bench", "step", "--device", "bogus"], "--device 'bogus' is not a device"),
    (["bench", "step", "--steps", "0"], "--steps must be at least 1"),
    (["compare", "adamw", "--epochs", "inf"], "--epochs must be positive and finite"),
    (["compare", "adamw", "--epochs", "1e300"], "a run takes at most 10,000,000"),
    (["compare", "adamw", "--steps", "0"], "--steps must be at least 1 and at most 10,000,000"),
    (["compare", "adamw", "--seeds", "99999999999999999999999"], "not an integer from 0 to 2**63 - 1"),
    (["compare", "adamw", "--seeds", "0-3000000000"], "a comparison runs at most 1000"),
    (["compare", "adamw", "--seed", "-1"], "not an integer from 0 to 2**63 - 1"),
    (["explain", "deep_rules.toml", "--model", "opcomp.comparison.models:cnn"], "too deeply"),
    (["explain", "fog", "--defs", "bad_lr.opc"], "'# lr: abc' above 'mine' is not a learning rate"),
    (["compare", "adamw", "--out", "/proc/opcomp-cannot-write-here"], "--out /proc/opcomp-cannot-write-here"),
]
if not __import__("torch").cuda.is_available():
    CASES.append((["bench", "step", "--device", "cuda"], "this machine has no CUDA device"))


@pytest.fixture
def here(tmp_path, monkeypatch):
    """A working directory holding the modules and files above, as a user's would."""
    for name, text in MODULES.items():
        (tmp_path / (name if "." in name else f"{name}.py")).write_text(text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    import sys

    for name in [*(n for n in MODULES if "." not in n), "my_tasks"]:
        sys.modules.pop(name, None)


@pytest.mark.parametrize(("argv", "words"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_a_bad_argument_gets_one_line_and_exit_2(here, capsys, argv, words):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out == ""
    first, *rest = captured.err.rstrip("\n").splitlines()
    assert all(line.startswith("  ") for line in rest), captured.err  # only a caret under the source, if any
    assert first.startswith("opcomp:") and words in first, captured.err


def test_a_task_module_in_the_current_directory_is_found(here, capsys):
    (here / "my_tasks.py").write_text(
        "import torch\nfrom torch import nn\nfrom opcomp.comparison.tasks import Task\n\n"
        "def data():\n    return torch.randn(16, 3), torch.randint(0, 2, (16,))\n\n"
        "def fn():\n    return Task('mine', lambda: nn.Linear(3, 2), lambda g: data(), data(), metric='loss')\n",
        encoding="utf-8",
    )
    assert main(["compare", "adamw", "--task", "my_tasks:fn", "--steps", "2", "--out", str(here / "out")]) == 0
    assert (here / "out" / "report.md").exists()


def test_without_matplotlib_the_report_is_written_without_plots_and_says_how_to_get_them(here, monkeypatch, capsys):
    from opcomp.comparison import report as compare_report

    monkeypatch.setattr(compare_report, "plots_available", lambda: False)
    assert main(["compare", "adamw", "--steps", "2", "--out", str(here / "out")]) == 0
    assert "pip install 'opcomp[bench]'" in capsys.readouterr().err  # said before training
    report = (here / "out" / "report.md").read_text(encoding="utf-8")
    assert "pip install 'opcomp[bench]' adds them" in report and "data:image/png" not in report
    assert not list((here / "out").glob("*.png"))


def test_the_table_in_docs_cli_is_what_the_command_says(here, capsys):
    """docs/cli.md lists each case above with its line: the page and the command agree."""
    from pathlib import Path

    page = (Path(__file__).parents[1] / "docs" / "cli.md").read_text(encoding="utf-8")
    rows = {}
    for line in page.splitlines():
        if line.startswith("| `opcomp "):
            command, said = line.split("` | ", 1)
            rows[command.removeprefix("| `opcomp ")] = said.removesuffix(" |").replace("\\|", "|")
    for argv, _ in CASES:
        assert main(argv) == 2
        first = capsys.readouterr().err.splitlines()[0]
        assert rows.get(" ".join(argv)) == first, " ".join(argv)
