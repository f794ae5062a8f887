"""Every preset trains every built-in kind of model at its recommended lr for that kind: a conv net with
BatchNorm and an MLP on digits, a character transformer on Python's help text.

Measured with ``python -m opcomp.bench.preset_lrs --tasks digits:cnn-bn digits:mlp pydoc
--factors 1 --steps 30`` (seed 0, constant lr): the validation loss after 30 steps over before.
Each preset must achieve at least half of that improvement. Zeroth-order presets improve little in
30 steps (their stable step shrinks with the number of parameters), but every run improves.
"""

from __future__ import annotations

import pytest

import opcomp
from opcomp.bench.sweep import task_named, train_ratio
from opcomp.learning_rates import model_kind, recommended_lr

TASKS = ("digits:cnn-bn", "digits:mlp", "pydoc")
MEASURED = {  # preset: validation loss ratio on each of TASKS
    "adagnoema": (0.146, 0.094, 0.584),
    "asam_sgd": (0.107, 0.320, 0.617),
    "awzo": (0.991, 0.998, 0.940),
    "diagfog": (0.088, 0.482, 0.583),
    "ds_shampoo": (0.063, 0.072, 0.698),
    "ekfac_sgd": (0.083, 0.170, 0.603),
    "f3eo": (0.066, 0.140, 0.613),
    "fog": (0.086, 0.338, 0.581),
    "fog_amortized": (0.086, 0.344, 0.580),
    "fs_adarmsuon": (0.086, 0.194, 0.630),
    "kfac_graft": (0.055, 0.048, 0.589),
    "kfac_sgd": (0.107, 0.647, 0.621),
    "mezo": (0.971, 0.999, 0.844),
    "muon_adamw": (0.082, 0.306, 0.583),
    "muon_soap": (0.093, 0.529, 0.584),
    "pi_muon": (0.116, 0.526, 0.599),
    "sam_sgd": (0.071, 0.328, 0.618),
    "sgd": (0.111, 0.665, 0.609),
}


def test_every_preset_is_measured():
    assert set(MEASURED) == set(opcomp.presets().names())


@pytest.fixture(scope="module")
def tasks():
    return {name: task_named(name) for name in TASKS}


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("preset", sorted(MEASURED))
def test_preset_lowers_the_validation_loss_at_its_recommended_lr(preset, task, tasks):
    lr = recommended_lr(preset, kind=model_kind(tasks[task].seeded_model(0)))
    ratio = train_ratio(tasks[task], preset, lr, steps=30)
    measured = MEASURED[preset][TASKS.index(task)]
    assert measured < 1 and ratio < (1 + measured) / 2, f"{preset} on {task}: {ratio:.5f} (measured {measured})"
