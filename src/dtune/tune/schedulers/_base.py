"""The scheduler contract: schedulers decide, the runner acts."""

from __future__ import annotations

import enum
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cloudpickle

from dtune.tune.trial import Trial, TrialStatus

__all__ = ["Decision", "Scheduler", "TrialSuggestion"]


class Decision(enum.Enum):
    """What a scheduler wants done with a trial after one of its results."""

    CONTINUE = "CONTINUE"
    PAUSE = "PAUSE"  # checkpoint, free the slot, and wait to be chosen again
    STOP = "STOP"  # finish the trial now (it counts as TERMINATED, not as an error)


@dataclass(frozen=True)
class TrialSuggestion:
    """Work a scheduler wants done in a free slot: run ``trial``, possibly changed.

    ``config`` replaces the trial's config (PBT's explore); ``donor`` makes the trial continue
    from the donor's newest durable checkpoint instead of its own (PBT's exploit). The runner
    copies that checkpoint into the trial's directory, so the donor may delete its own later,
    and records the change in ``trial.extra["lineage"]``.
    """

    trial: Trial
    config: dict[str, Any] | None = None
    donor: Trial | None = None
    end: bool = False

    @classmethod
    def stop(cls, trial: Trial) -> TrialSuggestion:
        """End a PAUSED trial where it is, without running it again (it counts as TERMINATED)."""
        return cls(trial, end=True)

    @classmethod
    def start(cls, trial: Trial) -> TrialSuggestion:
        """Run a PENDING trial as it is."""
        return cls(trial)

    @classmethod
    def resume(
        cls, trial: Trial, *, config: dict[str, Any] | None = None, donor: Trial | None = None
    ) -> TrialSuggestion:
        """Continue a PAUSED trial, optionally with a new config and/or a donor's checkpoint."""
        if donor is not None and donor.checkpoint is None:
            raise ValueError(f"Trial {donor.trial_id} has no checkpoint yet, so it cannot be exploited from.")
        return cls(trial, config, donor)


class Scheduler:
    """Decides, result by result, whether trials go on, pause or stop, and which runs next.

    Subclasses override what they need; every hook has a no-op default. A scheduler sees
    :class:`~dtune.tune.trial.Trial` objects read-only and never reaches into the runner or the
    store. ``metric`` and ``mode`` are set once by :func:`dtune.run` through
    :meth:`set_properties` unless the scheduler was given its own.
    """

    metric: str | None = None
    mode: str | None = None

    def set_properties(self, metric: str, mode: str) -> None:
        if self.metric is None:
            self.metric = metric
        if self.mode is None:
            self.mode = mode

    def on_trial_add(self, trial: Trial) -> None:
        """A new trial was created (it is PENDING)."""

    def on_result(self, trial: Trial, result: dict[str, Any]) -> Decision:
        """A running trial reported ``result``; say what to do with it."""
        return Decision.CONTINUE

    def on_trial_complete(self, trial: Trial, result: dict[str, Any] | None) -> None:
        """The trial finished (returned, or was stopped); ``result`` is its last one."""

    def on_trial_error(self, trial: Trial) -> None:
        """The trial failed for good (no retries left)."""

    def choose_next(self, trials: Sequence[Trial]) -> TrialSuggestion | None:
        """Pick what runs in a free slot among PENDING and PAUSED trials (first PENDING first).

        Returning None while trials wait lets the searcher start a new trial instead.
        """
        paused = None
        for trial in trials:
            if trial.status is TrialStatus.PENDING:
                return TrialSuggestion.start(trial)
            if paused is None and trial.status is TrialStatus.PAUSED and self.can_resume(trial):
                paused = trial
        return None if paused is None else TrialSuggestion.resume(paused)

    def decision_points(self, trial: Trial) -> bool | frozenset[int]:
        """Which of ``trial``'s reports wait for this scheduler's decision before training goes on.

        ``True``: every report; a set: the reports at these ``training_iteration`` values;
        ``False`` (the default): none. A report that does not wait costs the trial nothing, but
        a decision made on it reaches the trial a report or so later, so the trial overshoots a
        rung by that much (what Ray Tune avoids by blocking every report). Schedulers that decide
        at known milestones list them, so that they decide exactly there and nowhere else cost a
        round trip to the driver. Asked each time the trial starts or resumes.
        """
        return False

    def can_resume(self, trial: Trial) -> bool:
        """Whether a PAUSED trial may run again now (HyperBand waits for its rung to fill)."""
        return True

    def get_state(self) -> bytes:
        """Everything needed to carry on after a driver crash (the store persists it)."""
        return bytes(cloudpickle.dumps(self.__dict__))

    def set_state(self, state: bytes) -> None:
        self.__dict__.update(pickle.loads(state))
