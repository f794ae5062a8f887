"""DDP and FSDP2 on 2 ranks with half batches equal one process on the whole batch, the ranks agree
bit for bit, KFAC's decompositions split between them, a DCP checkpoint resumes exactly, and what
cannot be exact under a wrapper is refused at build (gloo on 127.0.0.1, real processes,
docs/distributed.md)."""

from __future__ import annotations

import ddp_cases
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from opcomp.distributed import DataParallel


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return ddp_cases.launch(tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize("case", ddp_cases.cases(), ids="-".join)
def test_ddp_steps_as_one_process_on_the_whole_batch(ranks, case):
    """Within float tolerance, or within what summing the batch in another order changes in one
    process, with Newton–Schulz in float32 on both sides (``ddp_cases.iterating_in_float32``: in
    bfloat16 a rounding-level change can cross a rounding step). Some steps are that sensitive
    still: fs_adarmsuon divides the probed gradient by the raw one's magnitude, and mezo's
    zeroth-order estimate is a difference of two losses (1e-4 of what they move, on an AMD EPYC)."""
    first, second = (rank["results"][case] for rank in ranks)
    assert all(torch.equal(a, b) for a, b in zip(first, second)), "the ranks' parameters differ"
    assert_as_one_process(first, case)


def assert_as_one_process(got: list[torch.Tensor], case: tuple) -> None:
    """``got`` equals one process on the whole batch within float tolerance, or within what summing
    the batch in another order changes in one process (three orders: each counts)."""
    reference = ddp_cases.train(*case)
    start = [p.detach() for p in ddp_cases.fresh(case[1]).parameters()]
    moved = max(float((p - s).abs().max()) for p, s in zip(reference, start))
    assert moved > 1e-3, "the reference did not train"
    error = max(float((a - b).abs().max()) for a, b in zip(got, reference))
    if error <= 1e-5 * moved:
        return
    rounding = max(
        float((a - b).abs().max())
        for shift in (ddp_cases.BATCH // 4, ddp_cases.BATCH // 2, 3 * ddp_cases.BATCH // 4)
        for a, b in zip(reference, ddp_cases.train(*case, shift=shift))
    )
    assert error <= max(1e-4 * moved, 2 * rounding), f"{error:.1e} off one process (its own rounding: {rounding:.1e})"


@pytest.mark.parametrize("case", ddp_cases.sharded_cases(), ids="-".join)
def test_fsdp2_steps_as_one_process_on_the_whole_batch(ranks, case):
    """FSDP2 shards every layer; Newton–Schulz and KFAC see whole matrices, so the step is one
    process's up to the order of its sums: to float precision, with the iteration in float32 as
    under DDP (in bfloat16, Block-KFAC's EKFAC on the conv net ended 6.8e-3 off on an AMD EPYC
    with AVX-512: its rounding crossed a bfloat16 step that reordering the batch did not)."""
    first, second = (rank["sharded"][case] for rank in ranks)
    assert all(torch.equal(a, b) for a, b in zip(first, second)), "the ranks' gathered parameters differ"
    assert_as_one_process(first, case)


@pytest.mark.parametrize("preset", ["adamw", "muon_adamw", "fog", "diagfog"])
def test_fsdp2_assigns_every_parameter_as_one_process_does(ranks, preset):
    for model in ddp_cases.MODELS:
        assigned = ranks[0]["sharded assignments"][preset, model]
        assert assigned == ddp_cases.built(preset, model)[1].assignments()
        assert any("kfac" in ops for ops in assigned.values()) == (preset in ("fog", "diagfog"))


@pytest.mark.parametrize("preset", ["adamw", "fog"])
def test_fsdp2_state_saved_with_dcp_on_2_ranks_resumes_bit_for_bit(ranks, preset):
    """Sharded moments and whole KFAC factors through torch.distributed.checkpoint: a fresh model
    and optimizer loaded from it take the next step exactly as the run that never stopped."""
    start = [p.detach() for p in ddp_cases.fresh("conv").parameters()]
    for rank in ranks:
        continued, straight = rank["resumed"][preset]
        assert all(torch.equal(a, b) for a, b in zip(continued, straight))
        assert not all(torch.equal(a, b) for a, b in zip(continued, start)), "nothing trained"


def test_rank_local_or_sharded_results_are_refused_at_build(ranks):
    refusals = ranks[0]["refusals"]
    assert "torch.distributed runs 2 processes" in refusals["not wrapped"]
    assert "data_parallel=" in refusals["not wrapped"]
    assert "probes" in refusals["fsdp2 probes"] and "DTensor shards (FSDP2" in refusals["fsdp2 probes"]
    assert "Kronecker factors of whole matrices (shampoo)" in refusals["fsdp2 shampoo"]
    assert refusals["local"] == "Optimizer"


def test_each_factor_is_decomposed_by_one_rank_and_shared(ranks):
    """fog's inversions on 2 ranks: the factors one process inverts, split between the ranks (the
    36-wide input factor of the hidden Linear on one, the three small ones on the other) — and fog
    still equals one process (the cases above)."""
    split = [rank["decompositions"] for rank in ranks]
    assert sorted(split[0] + split[1]) == ddp_cases.decompositions()
    assert split == [[36], [4, 9, 12]]


def test_each_matrix_is_orthogonalised_by_one_rank_and_shared(ranks):
    """muon_adamw on three equal hidden matrices: Newton–Schulz runs on 2 of them on one rank and 1
    on the other each step, the ranks end equal, and equal to one process within the rounding of
    averaged gradients."""
    (first, after), (second, after_second) = (rank["orthogonalised"] for rank in ranks)
    alone, reference = ddp_cases.orthogonalised()
    assert (first, second) == (2 * ddp_cases.STEPS, ddp_cases.STEPS) and alone == 3 * ddp_cases.STEPS
    assert all(torch.equal(a, b) for a, b in zip(after, after_second))
    for got, want in zip(after, reference):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@given(st.lists(st.floats(0, 1e6), max_size=40), st.integers(1, 8))
def test_owners_balance_the_work_as_longest_processing_time_first(costs, size):
    """Every piece goes to one rank, and no rank carries more than the least loaded one plus the
    largest piece (the LPT bound)."""
    owners = DataParallel(None, size, torch.device("cpu")).owners(costs)
    loads = [sum(c for c, o in zip(costs, owners) if o == rank) for rank in range(size)]
    assert all(0 <= o < size for o in owners)
    assert max(loads) <= min(loads) + max(costs, default=0.0) + 1e-6
