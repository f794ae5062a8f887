"""`opcomp compare` end to end on a tiny budget: results.json and the plots."""

from __future__ import annotations

import json
import math

import pytest
import system_data

from opcomp.cli import main


def test_compare_writes_results_and_plots(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["compare", "fog", "adamw", "sam_sgd", "--task", "digits", "--steps", "6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| optimizer | lr | train loss | validation loss | accuracy |" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "digits" and results["steps"] == 6
    assert [r["optimizer"] for r in results["runs"]] == ["fog", "adamw", "sam_sgd"]
    for run in results["runs"]:
        assert run["finished"] and math.isfinite(run["train_loss"]) and math.isfinite(run["validation_loss"])
        assert 0.0 <= run["metric_value"] <= 1.0 and run["history"][-1][0] == 6
    assert results["runs"][2]["passes"] == "2 forward, 2 backward"
    for name in ("loss_vs_step.png", "loss_vs_time.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_on_text_reports_perplexity_and_epochs_set_the_steps(tmp_path, capsys):
    out = tmp_path / "text"
    assert main(["compare", "diagfog", "--task", "charlm", "--epochs", "0.01", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    run = results["runs"][0]
    assert run["metric"] == "perplexity" and run["metric_value"] > 1.0
    assert results["steps"] == max(1, round(0.01 * (90_000 // (16 * 32))))


def test_tasks_that_need_a_missing_package_say_how_to_install_it(monkeypatch, capsys):
    from opcomp.bench import data

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
    [("fashion", "mlp", "dataset-fashion-mnist"), ("charlm-kjv", None, "bible-kjv"), ("mnist", "cnn", None)],
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
    from opcomp.bench import data

    monkeypatch.setattr(data, "FASHION", "/nonexistent")
    monkeypatch.delenv("OPCOMP_REQUIRE_SYSTEM_DATA", raising=False)
    with pytest.raises(pytest.skip.Exception, match="sudo apt-get install dataset-fashion-mnist"):
        system_data.require("dataset-fashion-mnist")
    monkeypatch.setenv("OPCOMP_REQUIRE_SYSTEM_DATA", "1")
    with pytest.raises(pytest.fail.Exception, match="sudo apt-get install dataset-fashion-mnist"):
        system_data.require("dataset-fashion-mnist")
