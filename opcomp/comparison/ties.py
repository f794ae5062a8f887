"""Which optimizers a comparison cannot tell from the best: Welch's t-test at 95% over seeds.

The best is the optimizer with the best mean of the task's test metric (highest accuracy, lowest
perplexity or loss). Another is *tied* with it when Welch's two-sided t-test over their seeds does
not reject equal means at the 5% level: |m₁ − m₂| ≤ t·√(s₁²/n₁ + s₂²/n₂), with t the 97.5%
quantile of Student's t at the Welch–Satterthwaite degrees of freedom, rounded down (a larger t:
the test leans towards calling a tie rather than a win). Two optimizers whose seeds all agree
exactly are tied; one seed each cannot be separated at all, and the verdict says so.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
"""Student's t, 97.5% quantile, for 1 to 10 degrees of freedom (beyond: :func:`critical_t`)."""


def critical_t(freedom: float) -> float:
    """The two-sided 95% critical value of Student's t at ``freedom`` degrees, rounded down to a
    whole degree (at least 1): from the table to 10, then the Cornish–Fisher expansion around the
    normal quantile z, z + (z³ + z)/(4ν) + (5z⁵ + 16z³ + 3z)/(96ν²), within 0.1% of the exact
    quantile from 11 degrees on."""
    whole = max(1, math.floor(freedom))
    if whole <= len(T_975):
        return T_975[whole - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * whole) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * whole**2)


def welch_tied(a: list[float], b: list[float]) -> bool:
    """Whether Welch's t-test at 95% fails to separate the means of ``a`` and ``b`` (two or more each)."""
    if len(set(a)) == 1 and len(set(b)) == 1:  # no spread: equal values tie, and fmean's rounding must
        return a[0] == b[0]  # not part them (the mean of [0.1] * 3 is not the mean of [0.1] * 2)
    mean_a, mean_b = statistics.fmean(a), statistics.fmean(b)
    var_a, var_b = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if var_a + var_b == 0:
        return mean_a == mean_b
    freedom = (var_a + var_b) ** 2 / (var_a**2 / (len(a) - 1) + var_b**2 / (len(b) - 1))
    return abs(mean_a - mean_b) <= critical_t(freedom) * math.sqrt(var_a + var_b)


@dataclass
class Verdict:
    """The best optimizer on the metric, those tied with it, and whether seeds could separate any."""

    best: str
    tied: list[str]
    separable: bool  # False with fewer than two seeds for the best or another
    fewest: int  # the fewest seeds any optimizer has

    def mark(self, optimizer: str) -> str:
        """The table's cell for ``optimizer``: best, tied with the best, or behind it."""
        if optimizer == self.best:
            return "best"
        if not self.separable:
            return "—"
        return "tied" if optimizer in self.tied else "behind"

    def sentence(self, metric: str) -> str:
        """The report's first line."""
        if not self.separable:
            return (
                f"Best test {metric}: {self.best}, on one seed, which cannot separate optimizers: run "
                "--seeds 0,1,2 to say which differences are more than seed noise."
            )
        if not self.tied:
            return f"Best test {metric}: {self.best}, ahead of every other (Welch's t-test over seeds, 95%)."
        few = (
            " With two seeds the test has about one degree of freedom and separates only differences"
            " beyond 12.7 standard errors: these ties may be too few seeds rather than equal optimizers;"
            " --seeds 0,1,2,3,4 tells more apart."
            if self.fewest == 2
            else ""
        )
        return (
            f"Best test {metric}: {self.best}, tied with {', '.join(self.tied)} (Welch's t-test over seeds "
            f"does not separate them at 95%).{few}"
        )


def verdict(values: dict[str, list[float]], higher_is_better: bool) -> Verdict | None:
    """The verdict on each optimizer's finite values over seeds; None when none has any."""
    values = {name: [v for v in vs if math.isfinite(v)] for name, vs in values.items()}
    values = {name: vs for name, vs in values.items() if vs}
    if not values:
        return None
    sign = -1.0 if higher_is_better else 1.0
    best = min(values, key=lambda name: sign * statistics.fmean(values[name]))
    separable = all(len(vs) > 1 for vs in values.values())
    tied = [n for n, vs in values.items() if n != best and separable and welch_tied(values[best], vs)]
    return Verdict(best, tied, separable, min(len(vs) for vs in values.values()))
