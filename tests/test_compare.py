"""`opcomp compare` end to end on tiny budgets: the report, user tasks, seeds, the tuner, time to target."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import quadratic_task
import system_data
import torch

import opcomp
from opcomp.cli import main


def test_compare_writes_one_report_with_table_and_plots_embedded(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["compare", "fog", "adamw", "sam_sgd", "--task", "digits", "--steps", "6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    header = "| optimizer | lr | validation loss | test loss | test accuracy | vs best | steps to accuracy ≥ 0.9 |"
    assert header in printed
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "digits" and results["settings"]["steps"] == 6 and results["seeds"] == [0]
    assert [r["optimizer"] for r in results["runs"]] == ["fog", "adamw", "sam_sgd"]
    for run in results["runs"]:
        assert run["finished"] and math.isfinite(run["validation_loss"]) and math.isfinite(run["test_loss"])
        assert 0.0 <= run["test_metric"] <= 1.0 and run["history"][-1][0] == 6 and run["evaluations"][-1][0] == 6
    assert results["runs"][2]["passes"] == "2 forward, 2 backward"
    report = (out / "report.md").read_text()
    assert printed.split("\n\nwrote")[0].strip() in report
    assert report.count("](data:image/png;base64,") == 2
    for name in ("loss_vs_step.png", "validation_vs_time.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_on_text_reports_perplexity_and_epochs_set_the_steps(tmp_path, capsys):
    out = tmp_path / "text"
    assert main(["compare", "diagfog", "--task", "charlm", "--epochs", "0.01", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    run = results["runs"][0]
    assert results["metric"] == "perplexity" and run["test_metric"] > 1.0
    assert results["settings"]["steps"] == max(1, round(0.01 * (80_000 // (16 * 32))))


def test_a_users_task_module_runs_by_module_function_with_seeds_aggregated(tmp_path, capsys):
    """The quadratic task through the command line, three seeds: the table's mean ± spread is the
    seeds' own, and the seeds differ (each seeds its model and batches)."""
    out = tmp_path / "user"
    arguments = ["g", "--task", "quadratic_task:task", "--steps", "4", "--seeds", "0,1,2", "--lr", "0.5"]
    assert main(["compare", *arguments, "--schedule", "constant", "--warmup", "0", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "quadratic" and results["seeds"] == [0, 1, 2]
    losses = [r["validation_loss"] for r in results["runs"]]
    assert [r["seed"] for r in results["runs"]] == [0, 1, 2]
    # w starts at 0 whatever the seed: every seed gives L₀·(1 − 0.5)^8 = 2/256
    assert losses == pytest.approx([2 / 256] * 3)
    summary = results["summary"][0]
    assert summary["validation_loss"]["mean"] == pytest.approx(statistics.fmean(losses))
    assert "0.0078 ± 0.0000" in capsys.readouterr().out


def test_seeds_change_the_initialisation_and_batches_and_the_spread_is_reported(tmp_path):
    comparison = opcomp.compare(["adamw"], task="digits", steps=5, seeds=(0, 1), model="mlp")
    first, second = comparison.runs
    assert first.validation_loss != second.validation_loss
    expected = f"{statistics.fmean([first.validation_loss, second.validation_loss]):.4f} ± "
    assert expected in comparison.table()


@pytest.mark.parametrize("center, chosen", [(0.1, 0.9), (30.0, 10 / 9)])
def test_tuning_extends_the_grid_past_its_edge_to_the_known_best(center, chosen):
    """On ½‖w − c‖² with SGD the best lr on the grid center·3^k is the one nearest 1. From 0.1 the
    grid {1/30, 0.1, 0.3} has its best on the upper edge: 0.9 is added, then 2.7 (worse), and 0.9
    is chosen. From 30 every lr of {10, 30, 90} overshoots; the grid grows down to 10/9 and 10/27."""
    comparison = opcomp.compare(
        ["g"], task=quadratic_task.task(), steps=5, lr=center, tune_lr=True, schedule="constant", warmup=0
    )
    (tuning,) = comparison.tuning
    assert tuning.chosen == pytest.approx(chosen)
    tried = [lr for lr, _ in tuning.tried]
    assert min(tried) < chosen < max(tried)  # the chosen lr is inside the grid, not on its edge
    best = min(tried, key=lambda lr: abs(1 - lr))
    assert tuning.chosen == best
    for lr, loss in tuning.tried:  # the scores are the closed form's
        assert loss == pytest.approx(2 * (1 - lr) ** 10, rel=1e-5)
    assert comparison.runs[0].lr == tuning.chosen  # the first seed's run is the chosen one


def test_time_to_target_is_the_first_evaluation_at_the_target():
    """L = 2·(1 − 0.5)^{2T} ≤ 1e-3 first at T = ⌈log(5e-4)/log(0.25)⌉ = 6."""
    comparison = opcomp.compare(["g"], task=quadratic_task.task(), steps=10, lr=0.5, schedule="constant", warmup=0)
    run = comparison.runs[0]
    assert run.steps_to_target == math.ceil(math.log(5e-4) / math.log(0.25)) == 6
    assert 0 < run.seconds_to_target <= run.seconds
    assert [e[0] for e in run.evaluations] == list(range(1, 11))


def test_cosine_warms_up_then_decays_to_zero():
    from opcomp.comparison.runs import lr_factor

    factor = lr_factor("cosine", 4, 20)
    assert [factor(t) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(12) == pytest.approx(0.5) and factor(20) == pytest.approx(0.0)
    assert all(factor(t) >= factor(t + 1) for t in range(4, 20))
    assert lr_factor("constant", 0, 20)(19) == 1.0


def test_a_text_file_is_a_task(tmp_path):
    from pydoc_data.topics import topics

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(topics.values())[:20_000])
    out = tmp_path / "text"
    assert main(["compare", "adamw", "--task", f"text:{corpus}", "--steps", "3", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == f"text:{corpus}" and results["metric"] == "perplexity"
    assert math.isfinite(results["runs"][0]["test_loss"])


def test_bad_tasks_are_errors_that_say_the_fix(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 1000)
    for task, words in (
        ("nosuch", "use one of charlm, digits, fashion, gpt2, kjv"),
        (f"text:{short}", "are too few for windows of 32"),
        (f"text:{latin}", "not UTF-8 text"),
        (f"text:{tmp_path / 'missing.txt'}", "No such file"),
        ("quadratic_task:not_a_task", "returned a int, not an opcomp.comparison.tasks.Task"),
        ("quadratic_task:nothing", "has no 'nothing' to call"),
        ("no_such_module:task", "cannot import 'no_such_module'"),
    ):
        assert main(["compare", "adamw", "--task", task, "--steps", "1"]) == 2, task
        assert words in capsys.readouterr().err, task
    assert main(["compare", "adamw", "--task", "quadratic_task:task", "--model", "mlp"]) == 2
    assert "--model picks a built-in model" in capsys.readouterr().err
    assert main(["compare", "adamw", "--task", "charlm", "--model", "mlp"]) == 2
    assert "the pydoc task trains one of gpt2, transformer, transformer-large" in capsys.readouterr().err
    assert main(["compare", "adamw", "--seeds", "0,x"]) == 2
    assert "--seeds takes integers" in capsys.readouterr().err


def test_tasks_that_need_a_missing_package_say_how_to_install_it(monkeypatch, capsys):
    from opcomp.comparison import data

    monkeypatch.setattr(data, "FASHION", "/nonexistent")
    assert main(["compare", "adamw", "--task", "fashion", "--steps", "1"]) == 2
    assert "sudo apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_rule_files_and_expressions_compare_alike(tmp_path, capsys):
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nmatch = { type = "Conv2d" }\nuse = "fog"\n[default]\nuse = "adamw"\n')
    out = tmp_path / "mixed"
    assert main(["compare", str(rules), "muon(g) | rms(g)", "--steps", "4", "--out", str(out)]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["optimizer"] for r in runs] == [str(rules), "muon(g) | rms(g)"]
    assert all(r["finished"] and math.isfinite(r["validation_loss"]) for r in runs)


@pytest.mark.parametrize(
    "task, model, package",
    [("fashion", "mlp", "dataset-fashion-mnist"), ("kjv", None, "bible-kjv"), ("mnist", "resnet", None)],
)
def test_debian_data_sets_and_the_mlp_train_through_compare(tmp_path, task, model, package):
    if package is not None:
        system_data.require(package)
    out = tmp_path / task
    extra = ["--model", model] if model else []
    assert main(["compare", "adamw", "--task", task, "--steps", "3", "--out", str(out), *extra]) == 0
    run = json.loads((out / "results.json").read_text())["runs"][0]
    assert run["finished"] and math.isfinite(run["validation_loss"]), task


def test_missing_system_data_skips_naming_the_install_command_and_fails_where_ci_requires_it(monkeypatch):
    from opcomp.comparison import data

    monkeypatch.setattr(data, "FASHION", "/nonexistent")
    monkeypatch.delenv("OPCOMP_REQUIRE_SYSTEM_DATA", raising=False)
    with pytest.raises(pytest.skip.Exception, match="sudo apt-get install dataset-fashion-mnist"):
        system_data.require("dataset-fashion-mnist")
    monkeypatch.setenv("OPCOMP_REQUIRE_SYSTEM_DATA", "1")
    with pytest.raises(pytest.fail.Exception, match="sudo apt-get install dataset-fashion-mnist"):
        system_data.require("dataset-fashion-mnist")


def test_the_task_module_of_docs_compare_runs_as_written(tmp_path, monkeypatch, capsys):
    """docs/compare.md's my_tasks.py, copied from the page, through --task my_tasks:regression."""
    from pathlib import Path

    page = (Path(__file__).parents[1] / "docs" / "compare.md").read_text(encoding="utf-8")
    source = page.split("```python\n# my_tasks.py\n", 1)[1].split("```", 1)[0]
    (tmp_path / "my_tasks.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    assert main(["compare", "fog", "adamw", "--task", "my_tasks:regression", "--steps", "5", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "regression" and results["metric"] == "loss"
    assert all(r["finished"] and math.isfinite(r["test_loss"]) for r in results["runs"])


@pytest.mark.parametrize("own_loss", [False, True])
def test_a_score_is_the_mean_loss_and_accuracy_over_every_chunk(own_loss):
    """Against the loss and accuracy computed here on the whole set at once; the built-in
    cross-entropy runs the model once per chunk, a task's own loss twice (loss, then argmax)."""
    from torch.nn import functional as F

    from opcomp.comparison.tasks import digits

    task = digits("mlp")
    if own_loss:
        task.loss = lambda model, x, y: F.cross_entropy(model(x), y)
    model = task.seeded_model(0)
    x, y = task.validation
    forwards = []
    handle = model.register_forward_hook(lambda module, inputs, output: forwards.append(len(inputs[0])))
    loss, accuracy = task.score(model, (x, y), chunk=100)
    handle.remove()
    with torch.no_grad():
        logits = model.eval()(x)
    assert loss == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    assert accuracy == int((logits.argmax(-1) == y).sum()) / len(y)
    chunks = math.ceil(len(y) / 100)
    assert len(forwards) == chunks * (2 if own_loss else 1)
