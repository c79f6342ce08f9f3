"""Median stopping: stop a trial that does worse than the median of the others so far.

Golovin, Solnik, Moitra, Kochanski, Karro, Sculley, "Google Vizier: A Service for Black-Box
Optimization", KDD 2017, section 3.2.2 ("Median Stopping Rule").

At time ``t >= grace_period`` a trial is stopped if its best result so far is strictly worse
than the median, over the *other* trials that have reached ``t`` (running or finished), of
their running averages up to ``t`` (the mean of their results with ``time_attr <= t``). With
fewer than ``min_samples`` such trials it continues. The rule needs no knowledge of the
horizon and no waiting, which makes it a sound default for long, expensive trials.

Example:
    >>> import dtune
    >>> scheduler = dtune.schedulers.MedianStopping(grace_period=5, min_samples=3)
"""

from __future__ import annotations

import bisect
import statistics
from typing import Any

from dtune.tune.schedulers._base import Decision, Scheduler
from dtune.tune.schedulers._common import check_mode, check_number, score
from dtune.tune.trial import Trial

__all__ = ["MedianStopping"]


class _History:
    """One trial's results as times and prefix sums, so a running mean costs one bisection."""

    __slots__ = ("best", "sums", "times")

    def __init__(self) -> None:
        self.times: list[float] = []
        self.sums: list[float] = [0.0]
        self.best = -float("inf")

    def add(self, t: float, value: float) -> None:
        if self.times and t < self.times[-1]:  # restarted from a checkpoint: drop the future
            cut = bisect.bisect_left(self.times, t)
            del self.times[cut:], self.sums[cut + 1 :]
        self.times.append(t)
        self.sums.append(self.sums[-1] + value)
        self.best = max(self.best, value)

    def mean_until(self, t: float) -> float:
        n = bisect.bisect_right(self.times, t)
        return self.sums[n] / n


class MedianStopping(Scheduler):
    """Vizier's median stopping rule (see the module docstring).

    Example:
        >>> import dtune
        >>> dtune.run(train, param_space=space, metric="acc", mode="max", num_samples=30,
        ...           scheduler=dtune.schedulers.MedianStopping(grace_period=3))  # doctest: +SKIP
    """

    def __init__(
        self,
        grace_period: float = 1,
        min_samples: int = 3,
        time_attr: str = "training_iteration",
        *,
        metric: str | None = None,
        mode: str | None = None,
    ) -> None:
        check_number("grace_period", grace_period, low=0)
        check_number("min_samples", min_samples, low=1, integer=True)
        check_mode(mode)
        self.grace_period, self.min_samples, self.time_attr = grace_period, min_samples, time_attr
        self.metric, self.mode = metric, mode
        self._histories: dict[str, _History] = {}

    def median_of_others(self, trial_id: str, t: float) -> float | None:
        """The median running average at ``t`` of the other trials that reached ``t``."""
        means = [
            history.mean_until(t)
            for other, history in self._histories.items()
            if other != trial_id and history.times and history.times[-1] >= t
        ]
        if len(means) < self.min_samples:
            return None
        return statistics.median(means)

    def decision_points(self, trial: Trial) -> bool | frozenset[int]:
        return True  # may decide on any result

    def on_result(self, trial: Trial, result: dict[str, Any]) -> Decision:
        t = result[self.time_attr]
        history = self._histories.setdefault(trial.trial_id, _History())
        history.add(t, score(result, self.metric, self.mode))
        if t < self.grace_period:
            return Decision.CONTINUE
        median = self.median_of_others(trial.trial_id, t)
        if median is not None and history.best < median:
            return Decision.STOP
        return Decision.CONTINUE
