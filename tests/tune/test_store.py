from __future__ import annotations

import math
import sqlite3

import pytest

from dtune.tune.store import ExperimentStore
from dtune.tune.trial import Trial, TrialStatus


def test_nothing_is_written_before_flush_and_everything_after(tmp_path):
    store = ExperimentStore(tmp_path)
    trial = Trial("00000", {"x": 1.5, "nested": {"f": lambda: 1}})  # unpicklable by pickle: cloudpickle
    store.add_trial(trial)
    store.add_result("00000", {"loss": 1.0, "training_iteration": 1}, None)
    store.add_result("00000", {"loss": math.nan, "training_iteration": 2}, "/ckpt/2")
    other = sqlite3.connect(tmp_path / "experiment.db")
    assert other.execute("SELECT COUNT(*) FROM results").fetchone() == (0,)
    store.flush()
    assert other.execute("SELECT COUNT(*) FROM results").fetchone() == (2,)
    history = store.results("00000")
    assert history[0]["loss"] == 1.0 and math.isnan(history[1]["loss"])
    store.close()


def test_trials_round_trip_in_creation_order(tmp_path):
    store = ExperimentStore(tmp_path)
    for i in (2, 0, 1):
        store.add_trial(Trial(f"t{i}", {"i": i}))
    store.flush()
    trial = Trial("t0", {"i": 0}, status=TrialStatus.ERROR, error="tb", num_failures=2)
    trial.last_result = {"acc": 0.5}
    store.update_trial(trial)
    store.put_meta("k", b"v")
    store.close()
    reopened = ExperimentStore(tmp_path, readonly=True)
    trials = reopened.load_trials()
    assert [t.trial_id for t in trials] == ["t2", "t0", "t1"]
    assert trials[1].status is TrialStatus.ERROR and trials[1].error == "tb" and trials[1].num_failures == 2
    assert trials[1].last_result == {"acc": 0.5}
    assert reopened.get_meta("k") == b"v"


def test_truncate_drops_results_after_a_checkpoint(tmp_path):
    store = ExperimentStore(tmp_path)
    for i in range(1, 6):
        store.add_result("a", {"training_iteration": i}, None)
    store.flush()
    store.truncate_results("a", 3)
    assert [r["training_iteration"] for r in store.results("a")] == [1, 2, 3]


def test_readonly_store_of_missing_experiment_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="No dtune experiment"):
        ExperimentStore(tmp_path / "nope", readonly=True)
