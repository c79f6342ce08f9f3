"""The driver loop: turns searcher suggestions and scheduler decisions into work on the pool.

The runner is the only place that mutates trials. It feeds results to the searcher and the
scheduler, acts on their decisions, retries failed trials from their last checkpoint, and
queues every change for the store, which it flushes at least every ``FLUSH_INTERVAL_S``.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtune.runtime import GO, Event, WorkerGroup, WorkerHandle, WorkerPool
from dtune.tune.schedulers import Decision, Scheduler, TrialSuggestion
from dtune.tune.search import Searcher
from dtune.tune.store import FLUSH_INTERVAL_S, ExperimentStore
from dtune.tune.trainable import TrialSpec
from dtune.tune.trial import Trial, TrialStatus

__all__ = ["MetricNotReportedError", "RunnerConfig", "TrialRunner"]

log = logging.getLogger(__name__)

TASK_KEY = "trial"
StopCriterion = Mapping[str, float] | Callable[[str, dict[str, Any]], bool] | None


class MetricNotReportedError(ValueError):
    """The trials finished without ever reporting the metric the search optimises."""


@dataclass(frozen=True, kw_only=True)
class RunnerConfig:
    metric: str
    mode: str
    num_samples: int
    experiment_dir: str
    stop: StopCriterion = None
    max_failures: int = 0
    keep_checkpoints_num: int | None = None
    workers_per_trial: int = 1
    collective_timeout_s: float = 300.0


class TrialRunner:
    """Runs trials on a pool until the searcher is exhausted and every trial has finished."""

    def __init__(
        self,
        *,
        config: RunnerConfig,
        pool: WorkerPool,
        store: ExperimentStore,
        searcher: Searcher,
        scheduler: Scheduler,
        trials: list[Trial] | None = None,
        on_progress: Callable[[TrialRunner], None] | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.store = store
        self.searcher = searcher
        self.scheduler = scheduler
        self.trials: list[Trial] = list(trials or [])
        self._by_id = {t.trial_id: t for t in self.trials}
        self._waiting = [t for t in self.trials if t.status in (TrialStatus.PENDING, TrialStatus.PAUSED)]
        self._running: dict[str, WorkerGroup] = {}
        self._metric_seen = any(t.last_result and config.metric in t.last_result for t in self.trials)
        self._warned_nonfinite = False
        self._old_checkpoints: list[str] = []
        self._checkpoints: dict[str, list[str]] = {}
        self._last_flush = time.monotonic()
        self._on_progress = on_progress
        self.num_results = 0
        self.started_at = time.monotonic()
        self.should_stop: Callable[[], bool] = lambda: False

    # -- main loop -------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            while not self.should_stop():
                self._fill_slots()
                if not self._running and not self.pool.replacing:
                    if self._waiting:
                        raise RuntimeError(
                            f"{len(self._waiting)} trials are waiting but the scheduler chose none "
                            "while nothing runs; the scheduler cannot make progress."
                        )
                    break
                timeout = max(0.0, self._last_flush + FLUSH_INTERVAL_S - time.monotonic())
                for event in self.pool.wait(timeout):
                    self._handle(event)
                self._maybe_flush()
        finally:
            self.flush()

    def interrupt(self) -> None:
        """Leave running trials resumable (PENDING, restart from their last checkpoint)."""
        for trial_id in list(self._running):
            trial = self._by_id[trial_id]
            trial.status = TrialStatus.PENDING
            self.store.update_trial(trial)
        self._running.clear()
        self.flush()

    # -- starting work ---------------------------------------------------------------------------
    def _fill_slots(self) -> None:
        size = self.config.workers_per_trial
        idle = self.pool.idle()
        while len(idle) >= size:
            suggestion = self.scheduler.choose_next(self._waiting) if self._waiting else None
            if suggestion is None:
                trial = self._new_trial()
                suggestion = None if trial is None else TrialSuggestion.start(trial)
            if suggestion is None:
                return
            if not isinstance(suggestion, TrialSuggestion):
                raise TypeError(
                    f"{type(self.scheduler).__name__}.choose_next returned {suggestion!r}; it must "
                    "return a dtune.schedulers.TrialSuggestion or None."
                )
            if suggestion.end:
                self._end_waiting(suggestion.trial)
                continue
            workers, idle = idle[:size], idle[size:]
            self._start(suggestion, workers)

    def _end_waiting(self, trial: Trial) -> None:
        if trial not in self._waiting or trial.status is not TrialStatus.PAUSED:
            raise ValueError(
                f"{type(self.scheduler).__name__}.choose_next asked to stop trial {trial.trial_id}, "
                f"which is {trial.status}; TrialSuggestion.stop ends PAUSED trials only."
            )
        self._waiting.remove(trial)
        self._complete(trial)

    def _new_trial(self) -> Trial | None:
        if len(self.trials) >= self.config.num_samples or self.searcher.is_finished:
            return None
        trial_id = f"{len(self.trials):05d}"
        config = self.searcher.suggest(trial_id)
        if config is None:
            if not self._running and not self.searcher.is_finished:
                raise RuntimeError(
                    f"{type(self.searcher).__name__}.suggest() returned no config while no trial "
                    "is running, so no result can ever unblock it."
                )
            return None
        trial = Trial(trial_id, config)
        self.trials.append(trial)
        self._by_id[trial_id] = trial
        self.store.add_trial(trial)
        self.scheduler.on_trial_add(trial)
        return trial

    def _apply(self, suggestion: TrialSuggestion) -> None:
        """Give the trial its new config and/or a copy of the donor's checkpoint; record it."""
        trial, donor = suggestion.trial, suggestion.donor
        if suggestion.config is None and donor is None:
            return
        entry: dict[str, Any] = {"iteration": trial.iteration, "old_config": trial.config}
        if donor is not None:
            if donor.checkpoint is None:
                raise ValueError(
                    f"Trial {donor.trial_id} has no checkpoint yet, so it cannot be exploited from."
                )
            target = Path(self.config.experiment_dir, "trials", trial.trial_id)
            target = target / f"checkpoint_{donor.checkpoint_iteration:06d}_from_{donor.trial_id}"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(donor.checkpoint, target)
            trial.checkpoint, trial.checkpoint_iteration = str(target), donor.checkpoint_iteration
            self._track_checkpoint(trial.trial_id, str(target))
            entry.update(donor=donor.trial_id, donor_iteration=donor.checkpoint_iteration)
        if suggestion.config is not None:
            trial.config = dict(suggestion.config)
        entry["config"] = trial.config
        trial.extra.setdefault("lineage", []).append(entry)

    def _start(self, suggestion: TrialSuggestion, workers: list[WorkerHandle]) -> None:
        trial = suggestion.trial
        if trial in self._waiting:
            self._waiting.remove(trial)
        self._apply(suggestion)
        checkpoint = trial.checkpoint
        time_offset = float((trial.last_result or {}).get("time_total_s", 0.0)) if checkpoint else 0.0
        spec = TrialSpec(
            trial.trial_id,
            trial.config,
            self.config.experiment_dir,
            checkpoint,
            trial.checkpoint_iteration if checkpoint else 0,
            time_offset,
            True if self.config.stop is not None else self.scheduler.decision_points(trial),
        )
        trial.status = TrialStatus.RUNNING
        trial.stop_requested = trial.pause_requested = False
        group = WorkerGroup(trial.trial_id, workers, timeout_s=self.config.collective_timeout_s)
        group.start(self.pool, TASK_KEY, (spec,))
        self._running[trial.trial_id] = group
        self.store.update_trial(trial)

    # -- events ----------------------------------------------------------------------------------
    def _handle(self, event: Event) -> None:
        if event.task_id is None:
            return
        trial = self._by_id[event.task_id[0]]
        group = self._running[trial.trial_id]
        for result, checkpoint, awaited in event.items:
            if result is None:
                self._on_checkpoint(trial, checkpoint)
            else:
                self._on_result(trial, result, checkpoint, group, awaited)
        if not group.handle(self.pool, event):
            return  # other ranks are still running (or being taken down)
        del self._running[trial.trial_id]
        if group.failure is not None:
            self._on_failure(trial, group.failure[1], retry=True)
        else:
            value = group.value(0)
            if trial.num_results == 0:
                self._on_failure(
                    trial,
                    "The trainable returned without calling dtune.report(); report at least one "
                    "result (the metric the search optimises) before returning.",
                    retry=False,
                )
            elif value == "pause":
                trial.status = TrialStatus.PAUSED
                self._waiting.append(trial)
                self.store.update_trial(trial)
            else:
                self._complete(trial)

    def _on_checkpoint(self, trial: Trial, checkpoint: str) -> None:
        """A checkpoint of the state at the trial's last result, sent after it (see Trainable)."""
        trial.checkpoint = checkpoint
        trial.checkpoint_iteration = trial.iteration
        self._track_checkpoint(trial.trial_id, checkpoint)
        self.store.update_trial(trial)

    def _on_result(
        self, trial: Trial, result: dict[str, Any], checkpoint: str | None, group: WorkerGroup, awaited: bool
    ) -> None:
        self.num_results += 1
        trial.num_results += 1
        trial.last_result = result
        metric_value = result.get(self.config.metric)
        if metric_value is not None:
            self._metric_seen = True
            if not self._warned_nonfinite and not (
                isinstance(metric_value, (int, float)) and math.isfinite(metric_value)
            ):
                self._warned_nonfinite = True
                warnings.warn(
                    f"Trial {trial.trial_id} reported {self.config.metric}={metric_value!r}; "
                    "non-finite or non-numeric values are stored and ranked worst (warned once).",
                    RuntimeWarning,
                    stacklevel=1,
                )
        if checkpoint is not None:
            trial.checkpoint = checkpoint
            trial.checkpoint_iteration = int(result["training_iteration"])
            self._track_checkpoint(trial.trial_id, checkpoint)
        self.store.add_result(trial.trial_id, result, checkpoint)
        self.store.update_trial(trial)
        if trial.stop_requested or trial.pause_requested:
            return  # emitted before our decision reached the trial: recorded, not re-decided
        self.searcher.on_result(trial.trial_id, result)
        decision = self.scheduler.on_result(trial, result)
        if not isinstance(decision, Decision):
            raise TypeError(
                f"{type(self.scheduler).__name__}.on_result returned {decision!r}; "
                "it must return a dtune.schedulers.Decision."
            )
        if decision is Decision.CONTINUE and self._should_stop(trial.trial_id, result):
            decision = Decision.STOP
        if decision is Decision.STOP:
            trial.stop_requested = True
            group.control(self.pool, "stop")
        elif decision is Decision.PAUSE:
            trial.pause_requested = True
            group.control(self.pool, "pause")
        elif awaited:
            group.control(self.pool, GO)

    def _should_stop(self, trial_id: str, result: dict[str, Any]) -> bool:
        stop = self.config.stop
        if stop is None:
            return False
        if callable(stop):
            return bool(stop(trial_id, result))
        return any(key in result and result[key] >= threshold for key, threshold in stop.items())

    def _complete(self, trial: Trial) -> None:
        trial.status = TrialStatus.TERMINATED
        self.store.update_trial(trial)
        self.scheduler.on_trial_complete(trial, trial.last_result)
        self.searcher.on_complete(trial.trial_id, trial.last_result)
        if not self._metric_seen:
            keys = ", ".join(sorted(trial.last_result or {}))
            raise MetricNotReportedError(
                f"The metric {self.config.metric!r} was never reported: trial {trial.trial_id} "
                f"finished after reporting only: {keys}. Report {self.config.metric!r} with "
                "dtune.report() or pass one of these as `metric=`."
            )

    def _on_failure(self, trial: Trial, error: str, *, retry: bool) -> None:
        trial.error = error
        if retry and trial.num_failures < self.config.max_failures:
            trial.num_failures += 1
            log.warning(
                "Trial %s failed (%d of %d retries); restarting it from %s.",
                trial.trial_id,
                trial.num_failures,
                self.config.max_failures,
                trial.checkpoint or "the beginning",
            )
            self.restart_from_checkpoint(trial)
            return
        trial.status = TrialStatus.ERROR
        self.store.update_trial(trial)
        log.error("Trial %s errored:\n%s", trial.trial_id, error)
        self.scheduler.on_trial_error(trial)
        self.searcher.on_complete(trial.trial_id, trial.last_result, error=True)

    def restart_from_checkpoint(self, trial: Trial) -> None:
        """Make ``trial`` PENDING, first in line; results past its checkpoint are dropped and come again."""
        trial.status = TrialStatus.PENDING
        if trial in self._waiting:
            self._waiting.remove(trial)
        self._waiting.insert(0, trial)
        self.store.update_trial(trial)
        self.flush()
        self.store.truncate_results(trial.trial_id, trial.checkpoint_iteration)
        history = self.store.results(trial.trial_id)
        trial.num_results = len(history)
        trial.last_result = history[-1] if history else None

    # -- durability ------------------------------------------------------------------------------
    def _track_checkpoint(self, trial_id: str, path: str) -> None:
        keep = self.config.keep_checkpoints_num
        if keep is None:
            return
        paths = self._checkpoints.setdefault(trial_id, [])
        if path not in paths:
            paths.append(path)
        while len(paths) > keep:
            self._old_checkpoints.append(paths.pop(0))

    def _maybe_flush(self) -> None:
        if time.monotonic() - self._last_flush >= FLUSH_INTERVAL_S:
            self.flush()
            if self._on_progress is not None:
                self._on_progress(self)

    def flush(self) -> None:
        """Make every queued change durable, with consistent searcher and scheduler state."""
        self.store.put_meta("searcher_state", self.searcher.get_state())
        self.store.put_meta("scheduler_state", self.scheduler.get_state())
        self.store.flush()
        self._last_flush = time.monotonic()
        for path in self._old_checkpoints:  # deleted only once a newer one is durable
            shutil.rmtree(path, ignore_errors=True)
        self._old_checkpoints.clear()

    def counts(self) -> dict[TrialStatus, int]:
        counts = dict.fromkeys(TrialStatus, 0)
        for trial in self.trials:
            counts[trial.status] += 1
        return counts
