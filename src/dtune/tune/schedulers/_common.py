"""Pieces the schedulers share: argument checks, scoring, and what a scheduler may know of slots.

:class:`SlotView` exists because synchronous algorithms (HyperBand, PBT with ``synch=True``)
must know whether more trials will come before they compare a rung or a generation, and the
runner creates trials lazily, one per free slot, never telling the scheduler how many it will
create. The view infers it from the contract alone: when ``choose_next`` returns None the runner
asks the searcher for a new trial *at once*, so a decline that is not followed by
``on_trial_add`` before the scheduler's next call means the search had nothing to give. Such a
failed probe only proves anything while another trial is running (with every slot idle, a
failed probe ends the run), so the schedulers keep one trial running while they wait: see
``hold`` in ``_hyperband.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from dtune.tune.results import metric_score
from dtune.tune.trial import Trial, TrialStatus

__all__ = ["SlotView", "check_mode", "check_number", "iteration_points", "score"]

#: Consecutive failed probes after which the search counts as exhausted. One is not enough: the
#: searcher may have been waiting for the very results that arrive with the next call.
EXHAUSTED_AFTER = 2


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    strict: bool = False,
    high: float | None = None,
    integer: bool = False,
) -> None:
    """Raise with Optuna's template if ``value`` is not a number in the given range."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an integer" if integer else "a number"
        raise TypeError(f"The value of `{name}` is {value!r}, but must be {what}.")
    if not math.isfinite(value):
        raise ValueError(f"The value of `{name}` is {value!r}, but must be finite.")
    if low is not None and (value <= low if strict else value < low):
        raise ValueError(f"The value of `{name}` is {value!r}, but must be {'>' if strict else '>='} {low}.")
    if high is not None and value > high:
        raise ValueError(f"The value of `{name}` is {value!r}, but must be <= {high}.")


def check_mode(mode: str | None) -> None:
    if mode is not None and mode not in ("min", "max"):
        raise ValueError(f"The value of `mode` is {mode!r}, but must be 'min' or 'max'.")


def score(result: dict[str, Any], metric: str | None, mode: str | None) -> float:
    """The result's metric as a number where larger is better; missing or NaN ranks worst."""
    if metric is None or mode is None:
        raise RuntimeError("The scheduler has no metric/mode: pass them to dtune.run (or to the scheduler).")
    return metric_score(result.get(metric), mode)


class SlotView:
    """The trials a scheduler has seen, which of them keep a slot busy, and whether more come.

    Trial objects are refreshed from every call (after a driver restart the runner hands out new
    ones, and passes every unfinished trial to ``choose_next``); they are not pickled.
    """

    def __init__(self) -> None:
        self.live: dict[str, Trial] = {}
        self._declined = False
        self.failed_probes = 0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "live": {}}  # trial objects are the runner's, not state

    def see(self, trials: Iterable[Trial]) -> None:
        """Start of every scheduler call: keep the newest objects, settle a pending probe."""
        for trial in trials:
            self.live[trial.trial_id] = trial
        if self._declined:
            self._declined = False
            self.failed_probes += 1

    def added(self, trial: Trial) -> None:
        self.live[trial.trial_id] = trial
        self._declined = False
        self.failed_probes = 0

    def decline(self) -> None:
        """``choose_next`` is about to return None: the runner will now ask the searcher."""
        self._declined = True

    @property
    def exhausted(self) -> bool:
        """Whether the search looks unable to create trials (see the module docstring)."""
        return self.failed_probes >= EXHAUSTED_AFTER

    def active(self, but: str | None = None) -> list[Trial]:
        """Trials that will keep a slot busy: running, with no stop or pause on the way."""
        return [
            t
            for t in self.live.values()
            if t.trial_id != but
            and t.status is TrialStatus.RUNNING
            and not t.pause_requested
            and not t.stop_requested
        ]


def iteration_points(time_attr: str, milestones: Iterable[float]) -> bool | frozenset[int]:
    """``Scheduler.decision_points`` for decisions at ``milestones`` of ``time_attr``.

    Milestones in training iterations become the first iteration reaching each; any other time
    attribute cannot be known ahead, so every report waits.
    """
    if time_attr != "training_iteration":
        return True
    return frozenset(math.ceil(m - 1e-9) for m in milestones)
