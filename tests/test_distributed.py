"""DDP on 2 ranks with half batches equals one process on the whole batch, the ranks agree bit for
bit, and what cannot be exact under a wrapper is refused at build (gloo on 127.0.0.1, real
processes, docs/distributed.md)."""

from __future__ import annotations

import ddp_cases
import pytest
import torch


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return ddp_cases.launch(tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize("case", ddp_cases.cases(), ids="-".join)
def test_ddp_steps_as_one_process_on_the_whole_batch(ranks, case):
    """Within float tolerance, or within what summing the batch in another order changes in one
    process: Adam's first step is sign-like, and fs_adarmsuon orthogonalises it, so a rounding-level
    change can flip an entry near 0 (1e-3 on the conv net, in one process alone)."""
    first, second = (rank["results"][case] for rank in ranks)
    assert all(torch.equal(a, b) for a, b in zip(first, second)), "the ranks' parameters differ"
    reference, reordered = ddp_cases.train(*case), ddp_cases.train(*case, swapped=True)
    start = [p.detach() for p in ddp_cases.fresh(case[1]).parameters()]
    moved = max(float((p - s).abs().max()) for p, s in zip(reference, start))
    assert moved > 1e-3, "the reference did not train"
    rounding = max(float((a - b).abs().max()) for a, b in zip(reference, reordered))
    error = max(float((a - b).abs().max()) for a, b in zip(first, reference))
    assert error <= max(1e-4 * moved, 2 * rounding), f"{error:.1e} off one process (its own rounding: {rounding:.1e})"


def test_rank_local_results_are_refused_at_build(ranks):
    refusals = ranks[0]["refusals"]
    assert "torch.distributed runs 2 processes" in refusals["not wrapped"]
    assert "data_parallel=" in refusals["not wrapped"]
    assert "DTensor shards (FSDP2" in refusals["fsdp2"]
    assert refusals["local"] == "Optimizer"
