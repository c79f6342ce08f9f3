"""The durable experiment record: SQLite in WAL mode, written in batches by the driver.

Everything the driver learns is queued in memory and written in one transaction at most
``FLUSH_INTERVAL_S`` apart, together with a snapshot of the searcher's and scheduler's state.
Each transaction therefore records an exact prefix of the driver's history: after a crash the
store, the searcher and the scheduler agree with each other, and nothing reported more than
``FLUSH_INTERVAL_S`` before the crash is lost.
"""

from __future__ import annotations

import json
import pickle
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dtune.tune.trial import Trial, TrialStatus

__all__ = ["DB_NAME", "FLUSH_INTERVAL_S", "ExperimentStore"]

DB_NAME = "experiment.db"
FLUSH_INTERVAL_S = 0.2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB);
CREATE TABLE IF NOT EXISTS trials (
    trial_id TEXT PRIMARY KEY, position INTEGER, config BLOB, config_json TEXT, status TEXT,
    error TEXT, num_failures INTEGER, checkpoint TEXT, checkpoint_iteration INTEGER,
    last_result TEXT, num_results INTEGER, extra BLOB
);
CREATE TABLE IF NOT EXISTS results (
    trial_id TEXT, iteration INTEGER, data TEXT, checkpoint TEXT
);
CREATE INDEX IF NOT EXISTS results_by_trial ON results (trial_id, iteration);
"""


def _json(value: Any) -> str:
    return json.dumps(value, default=repr, separators=(",", ":"))


class ExperimentStore:
    """One experiment directory's database."""

    def __init__(self, experiment_dir: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(experiment_dir) / DB_NAME
        if readonly:
            if not self.path.exists():
                raise FileNotFoundError(f"No dtune experiment at {str(experiment_dir)!r} (no {DB_NAME}).")
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        self._positions: dict[str, int] = {}
        self._dirty: dict[str, Trial] = {}
        self._results: list[tuple[str, int, str, str | None]] = []
        self._meta: dict[str, bytes] = {}

    # -- queueing (cheap, in memory) -----------------------------------------------------------
    def add_trial(self, trial: Trial) -> None:
        self._positions.setdefault(trial.trial_id, len(self._positions))
        self._dirty[trial.trial_id] = trial

    def update_trial(self, trial: Trial) -> None:
        self._dirty[trial.trial_id] = trial

    def add_result(self, trial_id: str, result: dict[str, Any], checkpoint: str | None) -> None:
        self._results.append((trial_id, int(result.get("training_iteration", 0)), _json(result), checkpoint))

    def put_meta(self, key: str, value: bytes) -> None:
        self._meta[key] = value

    @property
    def pending(self) -> int:
        return len(self._results) + len(self._dirty)

    # -- durability ------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write everything queued in one transaction."""
        if not (self._results or self._dirty or self._meta):
            return
        rows = [self._trial_row(t) for t in self._dirty.values()]
        with self._transaction():
            if self._results:
                self._db.executemany("INSERT INTO results VALUES (?, ?, ?, ?)", self._results)
            if rows:
                self._db.executemany(
                    "INSERT OR REPLACE INTO trials VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows
                )
            if self._meta:
                self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(self._meta.items()))
        self._results, self._dirty, self._meta = [], {}, {}

    def _transaction(self) -> Any:
        db = self._db

        class _Tx:
            def __enter__(self) -> None:
                db.execute("BEGIN")

            def __exit__(self, exc_type: Any, *_: Any) -> None:
                db.execute("ROLLBACK" if exc_type else "COMMIT")

        return _Tx()

    def _trial_row(self, t: Trial) -> tuple[Any, ...]:
        return (
            t.trial_id,
            self._positions.setdefault(t.trial_id, len(self._positions)),
            _dumps_config(t.config),
            _json(t.config),
            t.status.value,
            t.error,
            t.num_failures,
            t.checkpoint,
            t.checkpoint_iteration,
            None if t.last_result is None else _json(t.last_result),
            t.num_results,
            pickle.dumps(t.extra),
        )

    def close(self) -> None:
        self.flush()
        self._db.close()

    # -- reading ---------------------------------------------------------------------------------
    def get_meta(self, key: str) -> bytes | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def has_experiment(self) -> bool:
        return self.get_meta("spec") is not None

    def load_trials(self) -> list[Trial]:
        rows = self._db.execute(
            "SELECT trial_id, config, status, error, num_failures, checkpoint, checkpoint_iteration, "
            "last_result, num_results, extra FROM trials ORDER BY position"
        ).fetchall()
        trials = []
        for row in rows:
            trial = Trial(
                trial_id=row[0],
                config=_loads_config(row[1]),
                status=TrialStatus(row[2]),
                error=row[3],
                num_failures=row[4],
                checkpoint=row[5],
                checkpoint_iteration=row[6],
                last_result=None if row[7] is None else json.loads(row[7]),
                num_results=row[8],
                extra=pickle.loads(row[9]) if row[9] else {},
            )
            self._positions[trial.trial_id] = len(self._positions)
            trials.append(trial)
        return trials

    def results(self, trial_id: str) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT data FROM results WHERE trial_id = ? ORDER BY iteration, rowid", (trial_id,)
        ).fetchall()
        return [json.loads(row[0]) for row in rows]

    def all_results(self) -> Iterable[tuple[str, dict[str, Any]]]:
        for trial_id, data in self._db.execute("SELECT trial_id, data FROM results ORDER BY rowid"):
            yield trial_id, json.loads(data)

    def truncate_results(self, trial_id: str, after_iteration: int) -> None:
        """Drop a trial's results past ``after_iteration`` (they will be reported again)."""
        with self._transaction():
            self._db.execute(
                "DELETE FROM results WHERE trial_id = ? AND iteration > ?", (trial_id, after_iteration)
            )


def _dumps_config(config: dict[str, Any]) -> bytes:
    try:
        return pickle.dumps(config, protocol=5)
    except Exception:
        import cloudpickle

        return bytes(cloudpickle.dumps(config, protocol=5))


def _loads_config(blob: bytes) -> dict[str, Any]:
    return dict(pickle.loads(blob))
