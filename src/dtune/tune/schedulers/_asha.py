"""ASHA: asynchronous successive halving.

Li, Jamieson, Rostamizadeh, Gonina, Ben-tzur, Hardt, Recht, Talwalkar, "A System for Massively
Parallel Hyperparameter Tuning", MLSys 2020 (arXiv:1810.05934).

A bracket has rungs at ``grace_period * reduction_factor**k`` (below ``max_t``). When a trial
first reaches a rung its metric is recorded there, and it goes on only if it ranks among the
top ``max(1, n // reduction_factor)`` of the ``n`` values recorded at that rung so far (itself
included, ties in its favour); otherwise it stops. No trial ever waits for another, so slots
never idle; the price is that early trials are judged against few peers. This is the stopping
form of ASHA that Ray Tune's ``ASHAScheduler`` and Optuna's ``SuccessiveHalvingPruner`` use;
the keep rule is Optuna's, so every decision can be computed by hand.

With ``brackets=b`` a trial joins bracket ``s`` in ``0..b-1`` (bracket ``s`` skips the first
``s`` rungs), drawn with probability proportional to ``e**(rungs in s)`` as in Ray Tune, from a
generator seeded by ``seed``.

Example:
    >>> import dtune
    >>> scheduler = dtune.schedulers.ASHA(max_t=100, grace_period=1, reduction_factor=3)
    >>> scheduler.rungs()  # milestones of bracket 0
    [1, 3, 9, 27, 81]
"""

from __future__ import annotations

import math
import random
from typing import Any

from dtune.tune.schedulers._base import Decision, Scheduler
from dtune.tune.schedulers._common import check_mode, check_number, iteration_points, score
from dtune.tune.trial import Trial

__all__ = ["ASHA"]


class ASHA(Scheduler):
    """Asynchronous successive halving (see the module docstring for the exact rule).

    Example:
        >>> import dtune
        >>> def train(config):
        ...     for t in range(100):
        ...         dtune.report({"loss": (config["x"] - 0.3) ** 2 + 1 / (t + 1)})
        >>> dtune.run(train, param_space={"x": dtune.uniform(0, 1)}, metric="loss", mode="min",
        ...           num_samples=50, scheduler=dtune.schedulers.ASHA(max_t=100))  # doctest: +SKIP
    """

    def __init__(
        self,
        max_t: float = 100,
        grace_period: float = 1,
        reduction_factor: float = 3,
        brackets: int = 1,
        time_attr: str = "training_iteration",
        *,
        metric: str | None = None,
        mode: str | None = None,
        seed: int | None = None,
    ) -> None:
        check_number("max_t", max_t, low=0, strict=True)
        check_number("grace_period", grace_period, low=0, strict=True, high=max_t)
        check_number("reduction_factor", reduction_factor, low=2)
        check_number("brackets", brackets, low=1, integer=True)
        check_mode(mode)
        self.max_t, self.grace_period, self.reduction_factor = max_t, grace_period, reduction_factor
        self.time_attr, self.metric, self.mode = time_attr, metric, mode
        self._rng = random.Random(seed)
        # per bracket: milestone -> {trial_id: score}; milestones ascending
        self._rungs: list[dict[float, dict[str, float]]] = [
            {milestone: {} for milestone in self._milestones(s)} for s in range(brackets)
        ]
        self._bracket: dict[str, int] = {}

    def _milestones(self, s: int) -> list[float]:
        milestones: list[float] = []
        k = s
        while True:
            milestone = self.grace_period * self.reduction_factor**k
            if milestone >= self.max_t:
                return milestones
            milestones.append(int(milestone) if float(milestone).is_integer() else milestone)
            k += 1

    def rungs(self, bracket: int = 0) -> list[float]:
        """The milestones of ``bracket``, ascending."""
        return list(self._rungs[bracket])

    def recorded(self, milestone: float, bracket: int = 0) -> dict[str, float]:
        """``{trial_id: score}`` recorded at a rung (scores: larger is better)."""
        return dict(self._rungs[bracket][milestone])

    def on_trial_add(self, trial: Trial) -> None:
        if len(self._rungs) == 1:
            self._bracket[trial.trial_id] = 0
            return
        weights = [math.exp(len(r) - max(len(r) for r in self._rungs)) for r in self._rungs]
        self._bracket[trial.trial_id] = self._rng.choices(range(len(self._rungs)), weights)[0]

    def decision_points(self, trial: Trial) -> bool | frozenset[int]:
        if trial.trial_id not in self._bracket:
            self.on_trial_add(trial)
        return iteration_points(self.time_attr, [*self._rungs[self._bracket[trial.trial_id]], self.max_t])

    def on_result(self, trial: Trial, result: dict[str, Any]) -> Decision:
        t = result[self.time_attr]
        if t >= self.max_t:
            return Decision.STOP
        value = score(result, self.metric, self.mode)
        if trial.trial_id not in self._bracket:  # e.g. added before a scheduler was swapped in
            self.on_trial_add(trial)
        for milestone, recorded in self._rungs[self._bracket[trial.trial_id]].items():
            if milestone > t:
                break
            if trial.trial_id in recorded:
                continue
            recorded[trial.trial_id] = value
            keep = max(1, math.floor(len(recorded) / self.reduction_factor))
            better = sum(1 for other in recorded.values() if other > value)
            if better >= keep:
                return Decision.STOP
        return Decision.CONTINUE
