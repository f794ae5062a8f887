"""`opcomp compare` with any optimizer class beside opcomp's expressions: class paths with keyword
arguments, user classes from the current directory, (name, factory) pairs, and one-line errors."""

from __future__ import annotations

import json
import textwrap
import time

import pytest
import torch

import opcomp
from opcomp.cli import main
from opcomp.comparison.entries import entry
from opcomp.comparison.report import markdown
from opcomp.comparison.runs import lr_factor, warm_up

USER_MODULE = '''
import torch


class PlainSGD(torch.optim.Optimizer):
    """p ← p − lr·g, the least an optimizer class can be."""

    def __init__(self, params, lr=0.05):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


class Refuses(torch.optim.Optimizer):
    def __init__(self, params, lr=0.1):
        raise ValueError("this optimizer takes no convolutions")


NotAnOptimizer = dict
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_optimizers.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.chdir(tmp_path)
    yield "my_optimizers"


def test_a_run_mixes_an_expression_a_torch_class_and_a_users_class(user_module, tmp_path, capsys):
    out = tmp_path / "mixed"
    entries = ["fog", "torch.optim.AdamW", "my_optimizers:PlainSGD", "torch.optim.SGD[lr=0.02, momentum=0.9]"]
    assert main(["compare", *entries, "--task", "digits", "--steps", "6", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    runs = {run["optimizer"]: run for run in results["runs"]}
    assert list(runs) == entries
    assert [runs[name]["lr"] for name in entries] == [0.03, 0.001, 0.05, 0.02]  # each one's own
    for run in runs.values():
        assert run["finished"] and run["history"][-1][0] == 6
    assert runs["torch.optim.AdamW"]["passes"] == "1 forward, 1 backward"
    report = (out / "report.md").read_text()
    assert "Optimizer classes start from the lr each sets itself" in report
    assert "torch.optim.AdamW 0.001" in report and "NOT tuned" in report


class Recorder(torch.optim.SGD):
    """SGD that writes down its group's lr at every step."""

    seen: list[float] = []

    def step(self, closure=None):
        Recorder.seen.append(self.param_groups[0]["lr"])
        return super().step(closure)


def test_the_schedule_runs_through_the_class_groups_lr_and_a_factory_is_an_entry():
    Recorder.seen = []
    comparison = opcomp.compare([("recorder", lambda params: Recorder(params, lr=0.1))], task="digits", steps=10)
    factor = lr_factor("cosine", 10 // 20, 10)
    assert Recorder.seen == pytest.approx([0.1 * factor(t) for t in range(10)])
    assert comparison.runs[0].optimizer == "recorder" and comparison.runs[0].lr == 0.1


@pytest.mark.parametrize(
    "spec, said",
    [
        ("my_optimizers:NotAnOptimizer", "my_optimizers:NotAnOptimizer is not a torch.optim.Optimizer class"),
        ("torch.optim.NoSuchOptimizer", "'torch.optim' has no 'NoSuchOptimizer'"),
        ("missing_module:Lion", "cannot import 'missing_module'"),
        ("heavyball.SOAP[precondition_frequency=]", "keyword=literal pairs"),
        ("my_optimizers:Refuses", "my_optimizers:Refuses raised ValueError: this optimizer takes no convolutions"),
    ],
)
def test_an_entry_that_is_not_an_optimizer_gets_one_line_naming_it(user_module, spec, said):
    with pytest.raises(opcomp.OpcompError, match=None) as raised:
        opcomp.compare([spec], task="digits", steps=2)
    message = str(raised.value)
    assert said in message and "\n" not in message, message


def test_opcomp_expressions_are_never_taken_for_classes():
    for text in ("fog", "0.1 * adamw(g)", "muon[hidden](g) | adamw", "kfac[damping=1e-3](g)", "adaptive.toml"):
        assert entry(text).is_opcomp, text
    assert not entry("torch.optim.AdamW").is_opcomp


def test_state_bytes_counts_tensors_kept_in_lists_once_each():
    """heavyball keeps SOAP's eigenbases in lists: a report that skipped them would understate its state."""
    from opcomp.comparison.footprint import state_bytes

    class Nested(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 0.1})
            shared = torch.zeros(3)
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p] = {"m": torch.zeros(4), "Q": [torch.zeros(2, 2), (torch.zeros(5),)], "a": shared}
                    self.state[p]["b"] = shared  # the same tensor twice: counted once

    opt = Nested([torch.nn.Parameter(torch.zeros(1))])
    assert state_bytes(opt) == 4 * (4 + 4 + 5 + 3)


class CompilesFirst(torch.optim.SGD):
    """SGD whose first step takes half a second, as a class that compiles its step on first call does."""

    warm = False

    def step(self, closure=None):
        if not self.warm:
            self.warm = True
            time.sleep(0.5)
        return super().step(closure)


@pytest.mark.parametrize(
    "durations, warm",
    [
        ([35.2, 85.0, 0.009, 0.034, 0.010, 0.031, 0.009], 2),  # heavyball's SOAP compiling, on a CPU
        ([0.004] * 10, 0),
        ([0.05, *([0.004] * 9), 0.05, *([0.004] * 9)], 1),  # a refresh every 10 steps: only the first is warm-up
        ([1.0, 1.0, 1.0], 0),
        ([9.0, 0.001], 0),  # too short to tell
    ],
)
def test_warm_up_is_the_leading_steps_far_slower_than_the_median(durations, warm):
    assert warm_up(durations) == warm


def test_a_class_that_compiles_on_its_first_step_is_timed_after_it_and_the_report_says_so():
    comparison = opcomp.compare([("compiles", lambda p: CompilesFirst(p, lr=0.1))], task="digits", steps=8)
    run = comparison.runs[0]
    assert run.warmup_steps == 1 and run.warmup_seconds >= 0.5
    assert run.ms_per_step == pytest.approx((run.seconds - run.warmup_seconds) / 7 * 1e3)
    assert run.seconds_to_target is None or run.seconds_to_target >= 0.5  # wall-clock keeps it
    report = markdown(comparison, [])
    assert "Warm-up, left out of ms / step" in report and "compiles, seed 0: 1 step in " in report
