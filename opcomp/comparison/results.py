"""What a comparison records: each run, the settings every run shares, and the tuning's trials."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

WARM_UP = 10.0
"""A leading step this many times slower than its run's median step is warm-up (``Run.warmup_steps``)."""


@dataclass
class Run:
    """One optimizer, one seed, one learning rate, trained for the whole budget."""

    optimizer: str
    lr: float
    seed: int
    steps: int
    history: list[tuple[int, float, float]] = field(default_factory=list)  # (step, training s, mean train loss)
    evaluations: list[tuple[int, float, float, float]] = field(default_factory=list)  # (step, s, loss, metric)
    validation_loss: float = math.nan
    validation_metric: float = math.nan
    test_loss: float = math.nan
    test_metric: float = math.nan
    steps_to_target: int | None = None
    seconds_to_target: float | None = None
    seconds: float = 0.0
    ms_per_step: float = 0.0  # the mean over the steps after warm-up
    warmup_steps: int = 0  # leading steps far slower than the rest: compilation, first-call setup
    warmup_seconds: float = 0.0  # what they took, counted in seconds and seconds to target
    state_mb: float = 0.0
    passes: str = ""
    finished: bool = True  # false when the loss stopped being finite

    @property
    def score(self) -> float:
        """What tuning minimises: the final validation loss, infinite when the run blew up."""
        return self.validation_loss if self.finished and math.isfinite(self.validation_loss) else math.inf


@dataclass
class Settings:
    """How every run of a comparison trains."""

    steps: int = 300
    schedule: str = "cosine"
    warmup: int | None = None  # None: a twentieth of the steps
    device: str = "cpu"

    @property
    def warmup_steps(self) -> int:
        return self.steps // 20 if self.warmup is None else self.warmup


@dataclass
class Tuning:
    """Learning rates tried for one optimizer on the first seed, and the one chosen."""

    optimizer: str
    chosen: float
    tried: list[tuple[float, float]]  # (lr, final validation loss), in increasing lr
