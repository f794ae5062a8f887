"""Ties called ties: Welch's t-test over seeds against scipy's, and the verdict a report leads with."""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy import stats

from opcomp.comparison.report import Comparison, markdown, table
from opcomp.comparison.results import Run, Settings
from opcomp.comparison.ties import critical_t, verdict, welch_tied


@pytest.mark.parametrize("freedom", [1, 2, 3, 4, 7, 10, 11, 13, 20, 40, 120, 1000])
def test_the_critical_value_is_students_t_quantile(freedom):
    assert critical_t(freedom) == pytest.approx(stats.t.ppf(0.975, freedom), rel=1e-3)


def test_fractional_degrees_round_down_to_the_larger_critical_value():
    assert critical_t(2.9) == critical_t(2) > stats.t.ppf(0.975, 2.9)


samples = st.lists(st.integers(-100, 100).map(lambda v: v / 10), min_size=2, max_size=6)  # no cancellation


@settings(max_examples=60, deadline=None)
@given(samples, samples)
@example([0.1, 0.1], [0.1, 0.1, 0.1])  # equal values whose means round apart
def test_welch_calls_a_tie_wherever_scipys_welch_test_cannot_reject_at_95(a, b):
    """Rounding the degrees down only widens the interval: scipy's p ≥ 0.05 is always a tie, and
    p < 0.01 (far from the edge the rounding moves) never is."""
    if len(set(a)) == 1 and len(set(b)) == 1:
        assert welch_tied(a, b) == (a[0] == b[0])  # no spread: tied exactly when equal
        return
    p = stats.ttest_ind(a, b, equal_var=False).pvalue
    if math.isnan(p):
        return
    if p >= 0.05:
        assert welch_tied(a, b)
    if p < 0.01:
        assert not welch_tied(a, b)


def runs(name: str, metrics: list[float], ms: float = 10.0) -> list[Run]:
    return [
        Run(name, 0.01, seed, 10, validation_loss=1.0, test_loss=1.0, test_metric=m, ms_per_step=ms)
        for seed, m in enumerate(metrics)
    ]


def comparison(metric: str, entries: dict[str, list[float]]) -> Comparison:
    seeds = len(next(iter(entries.values())))
    every = [run for name, values in entries.items() for run in runs(name, values, 10.0 * (1 + len(name)))]
    return Comparison("digits", metric, None, Settings(steps=10), list(range(seeds)), every)


def test_two_equal_optimizers_tie_and_a_clearly_worse_one_is_behind():
    made = comparison(
        "accuracy",
        {"fog": [0.891, 0.893, 0.890], "muon_adamw": [0.892, 0.890, 0.891], "adamw": [0.870, 0.871, 0.869]},
    )
    decided = verdict({o: [r.test_metric for r in made.runs_of(o)] for o in made.optimizers}, True)
    assert (decided.best, decided.tied) == ("fog", ["muon_adamw"])
    report = markdown(made, [])
    assert report.splitlines()[2] == (
        "Best test accuracy: fog, tied with muon_adamw (Welch's t-test over seeds does not separate them at 95%)."
    )
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table(made).splitlines()[2:]}
    assert [rows[name][5] for name in ("fog", "muon_adamw", "adamw")] == ["best", "tied", "behind"]
    assert [rows[name][9] for name in ("fog", "muon_adamw", "adamw")] == ["1.00", "2.75", "1.50"]  # × fastest


def test_lower_is_better_for_perplexity():
    decided = verdict({"a": [6.1, 6.2, 6.0], "b": [5.0, 5.1, 4.9]}, higher_is_better=False)
    assert (decided.best, decided.tied) == ("b", [])
    assert (
        decided.sentence("perplexity")
        == "Best test perplexity: b, ahead of every other (Welch's t-test over seeds, 95%)."
    )


def test_one_seed_says_it_cannot_separate_them():
    made = comparison("accuracy", {"fog": [0.9], "adamw": [0.8]})
    report = markdown(made, [])
    assert report.splitlines()[2].startswith("Best test accuracy: fog, on one seed, which cannot separate optimizers")
    assert "NOT tuned" in report
    rows = [line.split(" | ") for line in table(made).splitlines()[2:]]
    assert [row[5] for row in rows] == ["best", "—"]


def test_two_seeds_say_their_ties_may_be_too_few_seeds():
    """0.90 against 0.35 ± 0.15 is no difference Welch's test can call on two seeds (t ≈ 5.3 against
    12.7 at one degree of freedom): the line says how little such a tie means."""
    made = comparison("accuracy", {"fog": [0.905, 0.900], "plain": [0.45, 0.24]})
    first = markdown(made, []).splitlines()[2]
    assert first.startswith("Best test accuracy: fog, tied with plain")
    assert "these ties may be too few seeds rather than equal optimizers" in first
    three = comparison("accuracy", {"fog": [0.905, 0.900, 0.903], "plain": [0.45, 0.24, 0.62]})
    assert "too few seeds" not in markdown(three, []).splitlines()[2]
