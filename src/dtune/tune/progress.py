"""What a person watching a search sees: a live table (rich) or periodic status lines."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from dtune.tune.results import metric_score
from dtune.tune.trial import Trial, TrialStatus

if TYPE_CHECKING:
    from dtune.tune.runner import TrialRunner

__all__ = ["Progress"]

_MAX_ROWS = 12
_LINE_INTERVAL_S = 10.0


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


class Progress:
    """verbose 0: silent; 1: a status line every 10 s and at the end; 2: a live table."""

    def __init__(self, verbose: int, metric: str, mode: str, experiment_dir: str) -> None:
        self.verbose = verbose
        self.metric, self.mode = metric, mode
        self.experiment_dir = experiment_dir
        self._live: Any = None
        self._last_line = time.monotonic()
        self._runner: TrialRunner | None = None
        if verbose >= 2:
            from rich.console import Console
            from rich.live import Live

            console = Console(file=sys.stdout)
            self._live = Live(console=console, auto_refresh=False, transient=False)
            self._live.start()

    def update(self, runner: TrialRunner) -> None:
        self._runner = runner
        if self._live is not None:
            self._live.update(self._table(runner), refresh=True)
        elif self.verbose == 1 and time.monotonic() - self._last_line >= _LINE_INTERVAL_S:
            self._last_line = time.monotonic()
            print(self._status_line(runner), flush=True)

    def close(self) -> None:
        if self._runner is not None and self.verbose >= 1:
            self.update(self._runner)
            if self._live is None:
                print(self._status_line(self._runner), flush=True)
        if self._live is not None:
            self._live.stop()

    # -- rendering -------------------------------------------------------------------------------
    def _status_line(self, runner: TrialRunner) -> str:
        counts = runner.counts()
        parts = [f"{status.value.lower()} {n}" for status, n in counts.items() if n]
        elapsed = time.monotonic() - runner.started_at
        best = self._best(runner.trials)
        best_text = (
            f", best {self.metric}={_fmt(best.last_result[self.metric])}" if best and best.last_result else ""
        )
        return f"[dtune] {elapsed:.1f}s: {', '.join(parts)}; {runner.num_results} results{best_text}"

    def _best(self, trials: list[Trial]) -> Trial | None:
        scored = [t for t in trials if t.last_result and self.metric in t.last_result]
        if not scored:
            return None
        return max(scored, key=lambda t: metric_score(t.last_result[self.metric], self.mode))  # type: ignore[index]

    def _table(self, runner: TrialRunner) -> Any:
        from rich.table import Table

        table = Table(title=self._status_line(runner), title_justify="left", caption=self.experiment_dir)
        running = [t for t in runner.trials if t.status is TrialStatus.RUNNING]
        scored = sorted(
            (t for t in runner.trials if t.last_result and self.metric in t.last_result and t not in running),
            key=lambda t: -metric_score(t.last_result[self.metric], self.mode),  # type: ignore[index]
        )
        rows = (running + scored)[:_MAX_ROWS]
        configs = [_flat(t.config) for t in rows]
        keys = [k for k in (configs[0] if configs else {}) if len({repr(c.get(k)) for c in configs}) > 1]
        for column in ["trial", "status", *keys, "iter", self.metric]:
            table.add_column(
                column, justify="left" if column in ("trial", "status") else "right", no_wrap=True
            )
        for trial, config in zip(rows, configs, strict=True):
            last = trial.last_result or {}
            table.add_row(
                trial.trial_id,
                trial.status.value,
                *(_fmt(config.get(k, "")) for k in keys),
                _fmt(last.get("training_iteration", "")),
                _fmt(last.get(self.metric, "")),
            )
        return table
