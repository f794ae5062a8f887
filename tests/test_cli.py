"""The `opcomp` command."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import torch

from opcomp.cli import main
from opcomp.ops import REGISTRY


def test_explain_shows_nodes_options_sharing_and_needs(capsys):
    assert main(["explain", "0.5 * adam(g) + 0.5 * muon(kfac(adam(g)))"]) == 0
    out = capsys.readouterr().out
    assert "canonical   0.5 * adam[b1=0.9, b2=0.999, eps=1e-08](g) + 0.5 * muon[" in out
    assert "#1   adam" in out and "shared by #2, #3 (computed once, one state)" in out
    assert "damping_mode=factored" in out and "invert_every=10" in out
    assert "shared      #1 adam" in out
    assert "needs       the model (build with the nn.Module, not .parameters())" in out


def test_explain_marks_options_that_differ_from_their_defaults(capsys):
    assert main(["explain", "sam[fisher, rho=0.1](adamw)"]) == 0
    out = capsys.readouterr().out
    assert "mode=fisher (default plain)" in out and "rho=0.1 (default 0.05)" in out
    assert "wd=0.01" in out and "wd=0.01 (default" not in out
    assert "needs       a closure: call opt.step(closure)" in out


def test_explain_of_a_fallback_lists_its_branches(capsys):
    assert main(["explain", "fog"]) == 0
    out = capsys.readouterr().out
    assert "branch 1    weights of hidden Linear, Conv1D and Conv2d layers (not embeddings or the output head)" in out
    assert "branch 2    every parameter: " in out


def test_errors_go_to_stderr_with_a_caret_and_exit_2(capsys):
    assert main(["explain", "muon(kfca(g))"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "unknown operator 'kfca' — did you mean 'kfac'?" in captured.err
    assert "  muon(kfca(g))\n       ^^^^" in captured.err


def test_definitions_file(tmp_path, capsys):
    defs = tmp_path / "mine.opc"
    defs.write_text("mine[b=0.9] = muon[beta=b](g) | adamw\n")
    assert main(["format", "mine[b=0.5]", "--defs", str(defs)]) == 0
    canonical = "muon[beta=0.5, coefficients=jordan, gram=false, hidden=false, nesterov=true, steps=5](g) | adamw["
    assert capsys.readouterr().out.startswith(canonical)
    assert main(["format", "mine", "--defs", str(tmp_path / "missing.opc")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_operators_listing(capsys):
    assert main(["operators"]) == 0
    out = capsys.readouterr().out
    assert "kfac" in out and "sum" not in out.split()


def test_presets_listing_measures_cost_and_state(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "| fog | 0.03 | 0.03 | 0.03 | 1 forward, 1 backward |" in out
    assert "| sam_sgd | 0.1 | 0.1 | 0.03 | 2 forward, 2 backward | 4.0 |" in out  # one momentum buffer: 4 bytes
    assert "| asam_sgd | 0.1 | 0.1 | 0.01 | 2 forward, 2 backward |" in out
    assert "| sgd | 0.3 | 0.3 | 0.1 | 1 forward, 1 backward | 0.0 |" in out  # smaller on large CNNs
    assert "| ds_shampoo | 0.03 | 0.003 | 0.03 | 1 forward, 1 backward |" in out  # smaller on transformers
    assert "`muon[hidden](kfac[bf16=bf16](g)) \\| fallback * adamw(g)`" in out


def test_explain_on_a_model_shows_each_parameters_rule(capsys, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nmatch = { type = "Conv2d" }\nuse = "fog"\n[default]\nuse = "adamw"\n')
    assert main(["explain", str(rules), "--model", "opcomp.comparison.models:cnn"]) == 0
    out = capsys.readouterr().out
    adamw = REGISTRY["adamw"].lr  # a bare operator's recommended lr
    assert "param group 0  lr=0.03  (rule 1)" in out and f"param group 1  lr={adamw:g}  (default)" in out
    assert main(["explain", "fog", "--model", "opcomp.comparison.models:nothing"]) == 2
    assert "has no 'nothing'" in capsys.readouterr().err


def test_the_console_script_is_installed_and_runs():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "opcomp"]
    assert script.value == "opcomp.cli:main"
    run = subprocess.run(
        [sys.executable, "-m", "opcomp.cli", "explain", "muon(kfac(g))"], capture_output=True, text=True, check=True
    )
    assert "#2   muon" in run.stdout


def test_unreadable_definition_files_and_model_factories_are_errors_not_tracebacks(tmp_path, capsys):
    binary = tmp_path / "latin1.opc"
    binary.write_bytes("mine = adamw  # caf\xe9\n".encode("latin-1"))
    assert main(["format", "mine", "--defs", str(binary)]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err
    assert main(["format", "mine", "--defs", str(tmp_path)]) == 2  # a directory
    assert "cannot read --defs" in capsys.readouterr().err
    assert main(["explain", "fog", "--model", "opcomp.comparison.models:CharTransformer"]) == 2
    assert "needs arguments; give a function that takes none" in capsys.readouterr().err
    assert main(["explain", "fog", "--model", "opcomp.comparison.data:pydoc_text"]) == 2
    assert "not a torch.nn.Module" in capsys.readouterr().err


def test_rule_files_that_are_not_text_or_not_files_are_errors(tmp_path, capsys):
    binary = tmp_path / "latin1.toml"
    binary.write_bytes('[default]\nuse = "adamw"  # caf\xe9\n'.encode("latin-1"))
    folder = tmp_path / "folder.toml"
    folder.mkdir()
    for path, words in ((binary, "is not UTF-8 text"), (folder, "is a directory")):
        assert main(["explain", str(path), "--model", "opcomp.comparison.models:cnn"]) == 2
        assert words in capsys.readouterr().err


def test_compare_refuses_bad_lengths_and_devices_with_exit_2(capsys):
    for arguments, words in (
        (["--steps", "0"], "--steps must be at least 1"),
        (["--steps", "-5"], "--steps must be at least 1"),
        (["--epochs", "-1"], "--epochs must be positive"),
        (["--device", "bogus"], "is not a device"),
        (["--device", "cuda"], "no CUDA device"),
    ):
        if arguments[-1] == "cuda" and torch.cuda.is_available():
            continue
        assert main(["compare", "adamw", *arguments]) == 2, arguments
        assert words in capsys.readouterr().err
