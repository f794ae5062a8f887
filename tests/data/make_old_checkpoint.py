"""Writes checkpoint_<commit>.pt with the opcomp found on the path (a checkout of an earlier commit).

    git worktree add /tmp/old 4cc191a
    PYTHONPATH=/tmp/old python tests/data/make_old_checkpoint.py tests/data/checkpoint_4cc191a.pt

For each expression: the model and optimizer state after 10 steps of tests/test_resume.py's run,
and the parameters that version reaches after 10 more. test_resume loads it with today's opcomp.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_resume import data, model, run  # noqa: E402

import opcomp  # noqa: E402

EXPRESSIONS = ["muon(g) | adamw(g)", "adarmsuon | rms(ema[debias](g))"]


def saved(expression: str) -> dict:
    batches = data(20)
    net = model()
    opt = opcomp.build(expression, net, lr=0.01)
    run(net, opt, batches[:10])
    out = {"model": copy.deepcopy(net.state_dict()), "opt": copy.deepcopy(opt.state_dict())}
    run(net, opt, batches[10:])
    out["after"] = copy.deepcopy(net.state_dict())
    return out


if __name__ == "__main__":
    print(f"saving with {opcomp.__file__}")
    torch.save({expression: saved(expression) for expression in EXPRESSIONS}, sys.argv[1])
