"""Every preset trains a small CNN on digits and a small character transformer on Python's help text.

Measured with ``python -m opcomp.bench.sweep`` (30 steps at each preset's recommended lr, seed 0):
the loss on each task's fixed batch after training over before. Each preset must achieve at
least half of that improvement. Zeroth-order presets improve digits by only 0.04–0.2% in 30
steps (their stable step shrinks with the number of parameters); across four seeds every run
still improved.
"""

from __future__ import annotations

import pytest

import opcomp
from opcomp.bench.sweep import train
from opcomp.bench.tasks import digits, pydoc

MEASURED = {  # preset: (digits, pydoc)
    "adagnoema": (0.240, 0.617),
    "asam_sgd": (0.187, 0.607),
    "awzo": (0.99950, 0.966),
    "diagfog": (0.160, 0.575),
    "ekfac_sgd": (0.143, 0.612),
    "f3eo": (0.187, 0.759),
    "fog": (0.134, 0.571),
    "fs_adarmsuon": (0.151, 0.590),
    "kfac_sgd": (0.189, 0.608),
    "mezo": (0.99821, 0.882),
    "muon_adamw": (0.128, 0.573),
    "pi_muon": (0.105, 0.589),
    "sam_sgd": (0.153, 0.608),
    "sgd": (0.929, 0.618),
}

TASKS = {"digits": digits, "pydoc": pydoc}


def test_every_preset_is_measured():
    assert set(MEASURED) == set(opcomp.presets().names())


@pytest.mark.slow
@pytest.mark.parametrize("task", ["digits", "pydoc"])
@pytest.mark.parametrize("preset", sorted(MEASURED))
def test_preset_lowers_the_training_loss_on_real_data(preset, task):
    lr = opcomp.presets().note(preset).lr
    ratio = train(TASKS[task](), preset, lr, steps=30)
    measured = MEASURED[preset][0 if task == "digits" else 1]
    assert ratio < (1 + measured) / 2, f"{preset} on {task}: {ratio:.5f} (measured {measured})"
