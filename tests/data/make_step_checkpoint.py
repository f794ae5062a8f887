"""Writes step_checkpoint_<commit>.pt with the opcomp found on the path (a checkout of an earlier commit).

    git worktree add /tmp/old <commit>
    PYTHONPATH=/tmp/old python tests/data/make_step_checkpoint.py tests/data/step_checkpoint_<commit>.pt

For each preset (a layer statistic, torch's fused AdamW, a probe that needs a closure): the model and
optimizer state after 6 steps on a small conv net, and the parameters and optimizer state that version
reaches after 6 more. tests/test_step_checkpoint.py loads it with today's opcomp and continues as that version did.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_step_checkpoint import PRESETS, batches, model, run  # noqa: E402

import opcomp  # noqa: E402


def saved(preset: str) -> dict:
    data = batches(12)
    net = model()
    opt = opcomp.build(preset, net, lr=0.01)
    run(net, opt, data[:6])
    out = {"model": copy.deepcopy(net.state_dict()), "opt": copy.deepcopy(opt.state_dict())}
    run(net, opt, data[6:])
    out["after"] = copy.deepcopy(net.state_dict())
    out["opt_after"] = copy.deepcopy(opt.state_dict())
    return out


if __name__ == "__main__":
    print(f"saving with {opcomp.__file__}")
    torch.save({preset: saved(preset) for preset in PRESETS}, sys.argv[1])
