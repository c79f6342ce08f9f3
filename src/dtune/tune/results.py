"""What a search leaves behind: every trial's config, metrics, history, checkpoint and error."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtune.tune.checkpoint import Checkpoint
from dtune.tune.store import ExperimentStore
from dtune.tune.trial import Trial, TrialStatus

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Results", "TrialResult"]


def metric_score(value: Any, mode: str) -> float:
    """A number where larger is better; missing, non-numeric and non-finite values rank worst."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return -math.inf
    return float(value) if mode == "max" else -float(value)


@dataclass(frozen=True)
class TrialResult:
    """One trial as it ended (or stands, for a search still in progress)."""

    trial_id: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    status: TrialStatus
    error: str | None
    checkpoint: Checkpoint | None
    path: str
    lineage: list[dict[str, Any]]
    _store: ExperimentStore

    @property
    def metrics_history(self) -> list[dict[str, Any]]:
        """Every result the trial reported, in order."""
        return self._store.results(self.trial_id)

    def metrics_dataframe(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame(self.metrics_history)


class Results:
    """The outcome of :func:`dtune.run`, read from the experiment store.

    Example:
        >>> results = dtune.run(...)  # doctest: +SKIP
        >>> results.best.config, results.best.metrics["acc"]  # doctest: +SKIP
    """

    def __init__(self, experiment_dir: str, metric: str, mode: str, trials: list[Trial] | None = None):
        self.experiment_path = str(experiment_dir)
        self.metric = metric
        self.mode = mode
        self._store = ExperimentStore(experiment_dir, readonly=True)
        loaded = trials if trials is not None else self._store.load_trials()
        self.trials = [self._view(t) for t in loaded]

    def _view(self, trial: Trial) -> TrialResult:
        return TrialResult(
            trial_id=trial.trial_id,
            config=trial.config,
            metrics=dict(trial.last_result or {}),
            status=trial.status,
            error=trial.error,
            checkpoint=Checkpoint(trial.checkpoint) if trial.checkpoint else None,
            path=str(Path(self.experiment_path, "trials", trial.trial_id)),
            lineage=list(trial.extra.get("lineage", [])),
            _store=self._store,
        )

    def __len__(self) -> int:
        return len(self.trials)

    def __iter__(self) -> Iterator[TrialResult]:
        return iter(self.trials)

    @property
    def errors(self) -> list[TrialResult]:
        """Trials that failed for good, with their tracebacks in ``.error``."""
        return [t for t in self.trials if t.status is TrialStatus.ERROR]

    @property
    def best(self) -> TrialResult:
        """The trial whose last result is best on the run's metric and mode."""
        return self.get_best()

    def get_best(
        self, metric: str | None = None, mode: str | None = None, scope: str = "last"
    ) -> TrialResult:
        """The best trial by ``metric``: over last results (``scope="last"``) or all results ("all")."""
        metric, mode = metric or self.metric, mode or self.mode
        if mode not in ("min", "max"):
            raise ValueError(f"The value of `mode` is {mode!r}, but must be 'min' or 'max'.")
        if scope not in ("last", "all"):
            raise ValueError(f"The value of `scope` is {scope!r}, but must be 'last' or 'all'.")
        if scope == "last":
            scores = {t.trial_id: metric_score(t.metrics.get(metric), mode) for t in self.trials}
        else:
            scores = dict.fromkeys((t.trial_id for t in self.trials), -math.inf)
            for trial_id, result in self._store.all_results():
                scores[trial_id] = max(scores[trial_id], metric_score(result.get(metric), mode))
        candidates = [t for t in self.trials if metric in t.metrics or scope == "all"]
        if not candidates:
            raise ValueError(f"No trial reported the metric {metric!r}, so there is no best trial.")
        return max(candidates, key=lambda t: scores[t.trial_id])

    def dataframe(self) -> pd.DataFrame:
        """One row per trial: id, status, ``config/...`` columns and the last reported metrics."""
        import pandas as pd

        rows = []
        for trial in self.trials:
            row: dict[str, Any] = {"trial_id": trial.trial_id, "status": trial.status.value}
            row.update(_flatten(trial.config, "config/"))
            row.update(trial.metrics)
            rows.append(row)
        return pd.DataFrame(rows)


def _flatten(config: dict[str, Any], prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
