"""Every scheduler (and the model-based searchers) with real worker processes, and resumed
after the driver is killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import dtune
from dtune.cli import main as cli
from dtune.tune.store import ExperimentStore
from dtune.tune.trial import TrialStatus
from tests.tune import _trainables as T

REPO = Path(__file__).resolve().parents[2]


def _run(trainable, tmp_path, **kwargs):
    kwargs.setdefault("metric", "loss")
    kwargs.setdefault("mode", "min")
    return dtune.run(trainable, storage=tmp_path / "exp", verbose=0, seed=0, max_concurrent=2, **kwargs)


def _closest(results, target=0.3):
    return min(results, key=lambda t: abs(t.config["x"] - target))


def _starts(trial) -> list[int]:
    return [int(s) for s in Path(trial.path, "starts").read_text().split()]


def test_asha_stops_bad_trials_exactly_at_their_rung(tmp_path):
    space = {"x": dtune.uniform(0, 1), "max_t": 9}  # no work per step: a late decision would show
    asha = dtune.schedulers.ASHA(max_t=9)
    results = _run(T.curve, tmp_path, param_space=space, num_samples=12, scheduler=asha)
    assert all(t.status is TrialStatus.TERMINATED for t in results)
    iterations = [t.metrics["training_iteration"] for t in results]
    assert set(iterations) <= {1, 3, 9}  # decided in-band on the result at the rung, not after it
    assert sum(i < 9 for i in iterations) >= 6
    assert _closest(results).metrics["training_iteration"] == 9


def test_median_stopping_stops_bad_trials_early(tmp_path):
    space = {"x": dtune.grid([0.3, 0.35, 0.25, 2.0, 0.28, 2.5]), "max_t": 10, "sleep": 0.01}
    scheduler = dtune.schedulers.MedianStopping(grace_period=2, min_samples=2)
    results = _run(T.curve, tmp_path, param_space=space, scheduler=scheduler)
    reached = {t.config["x"]: t.metrics["training_iteration"] for t in results}
    assert reached[2.0] < 10 and reached[2.5] < 10  # far worse than the median: stopped
    assert reached[0.3] == reached[0.35] == 10


def test_hyperband_pauses_and_resumes_from_checkpoints(tmp_path):
    space = {"x": dtune.uniform(0, 1), "max_t": 9, "sleep": 0.01}
    hb = dtune.schedulers.HyperBand(max_t=9)
    results = _run(T.curve, tmp_path, param_space=space, num_samples=9, scheduler=hb)
    assert all(t.status is TrialStatus.TERMINATED for t in results)
    winner = _closest(results)
    assert winner.metrics["training_iteration"] == 9
    resumed = [t for t in results if len(_starts(t)) > 1]
    assert resumed and all(s > 0 for t in resumed for s in _starts(t)[1:])  # from a checkpoint
    store = ExperimentStore(tmp_path / "exp", readonly=True)
    for trial in results:  # resumed exactly where it paused: no step lost, none repeated
        iterations = [r["training_iteration"] for r in store.results(trial.trial_id)]
        assert iterations == list(range(1, trial.metrics["training_iteration"] + 1))
        starts = _starts(trial)
        assert starts == sorted(set(starts)) and set(starts[1:]) <= set(iterations)
    # Pauses are decided in-band at rungs (checked exactly with a lagging runner in
    # test_schedulers), except for a trial held on past its rung while the rung filled: its
    # pause lands wherever it has got to, so where the pauses fall is not checked here.


def test_hyperband_with_a_class_trainable(tmp_path):
    space = {"lr": dtune.uniform(0.1, 1.0), "max_t": 9, "sleep": 0.005}
    results = _run(
        T.CurveClass, tmp_path, param_space=space, num_samples=9, metric="score", mode="max",
        scheduler=dtune.schedulers.HyperBand(max_t=9),
    )  # fmt: skip
    best = max(results, key=lambda t: t.config["lr"])
    assert best.metrics["training_iteration"] >= 9
    for trial in results:  # paused, restored and continued: progress matches the steps taken
        for result in trial.metrics_history:
            assert result["score"] == pytest.approx(result["training_iteration"] * trial.config["lr"])


def test_hyperband_says_clearly_that_it_needs_checkpoints(tmp_path):
    space = {"x": dtune.uniform(0, 1), "max_t": 9, "sleep": 0.01}
    with pytest.raises(RuntimeError, match="no checkpoint to resume from"):
        _run(T.curve_no_checkpoint, tmp_path, param_space=space, num_samples=9,
             scheduler=dtune.schedulers.HyperBand(max_t=9))  # fmt: skip


@pytest.mark.parametrize("trainable", [T.progress, T.CurveClass], ids=["function", "class"])
def test_pbt_exploits_with_lineage_recorded_and_exported(tmp_path, trainable, capsys):
    space = {"lr": dtune.choice([0.1, 0.2, 0.5, 1.0, 2.0, 3.0]), "max_t": 12, "sleep": 0.01}
    pbt = dtune.schedulers.PBT(3, {"lr": [0.1, 0.2, 0.5, 1.0, 2.0, 3.0]}, seed=0)
    results = _run(
        trainable, tmp_path, param_space=space, num_samples=6, metric="score", mode="max", scheduler=pbt
    )
    assert all(t.status is TrialStatus.TERMINATED for t in results)
    exploited = [t for t in results if t.lineage]
    assert exploited
    for trial in exploited:
        for entry in trial.lineage:
            assert entry["donor"] != trial.trial_id and entry["donor_iteration"] >= 1
    assert cli(["export", str(tmp_path / "exp"), "--format", "json"]) == 0
    exported = {t["trial_id"]: t["lineage"] for t in json.loads(capsys.readouterr().out)["trials"]}
    assert all(exported[t.trial_id] == t.lineage for t in results)
    if trainable is T.progress:  # a copy goes on from the donor's step with the explored lr
        checked = 0
        for trial in exploited:
            for entry in trial.lineage:
                step = entry["donor_iteration"] + 1
                after = [r for r in trial.metrics_history if r["training_iteration"] == step]
                if after and entry is trial.lineage[-1]:
                    assert after[-1]["lr"] == entry["config"]["lr"]
                    checked += 1
        assert checked


def test_hyperband_with_bohb_and_asha_with_limited_tpe(tmp_path):
    space = {"x": dtune.uniform(0, 1), "max_t": 9, "sleep": 0.005}
    hb = _run(T.curve, tmp_path / "hb", param_space=space, num_samples=14,
              scheduler=dtune.schedulers.HyperBand(max_t=9), search=dtune.search.BOHB(seed=0))  # fmt: skip
    assert len(hb) == 14 and all(t.status is TrialStatus.TERMINATED for t in hb)
    tpe = dtune.search.ConcurrencyLimiter(dtune.search.Optuna("tpe", seed=0, n_startup_trials=4), 2)
    asha = _run(T.curve, tmp_path / "asha", param_space=space, num_samples=14,
                scheduler=dtune.schedulers.ASHA(max_t=9), search=tpe)  # fmt: skip
    assert len(asha) == 14 and min(t.metrics["loss"] for t in asha) < 0.2


# -- the driver is killed with SIGKILL, then resumed --------------------------------------------------
DRIVER = textwrap.dedent(
    """
    import sys
    import dtune
    from tests.tune._trainables import curve, progress

    kind = sys.argv[2]
    if kind == "hyperband+bohb":
        trainable, metric, mode = curve, "loss", "min"
        space = {"x": dtune.uniform(0, 1), "max_t": 9, "sleep": 0.05}
        scheduler, search = dtune.schedulers.HyperBand(max_t=9), dtune.search.BOHB(seed=0)
    elif kind == "asha+tpe":
        trainable, metric, mode = curve, "loss", "min"
        space = {"x": dtune.uniform(0, 1), "max_t": 9, "sleep": 0.05}
        scheduler = dtune.schedulers.ASHA(max_t=9)
        search = dtune.search.Optuna("tpe", seed=0, n_startup_trials=3)
    else:
        trainable, metric, mode = progress, "score", "max"
        space = {"lr": dtune.uniform(0.1, 2.0), "max_t": 12, "sleep": 0.05}
        scheduler = dtune.schedulers.PBT(3, {"lr": dtune.uniform(0.1, 2.0)}, seed=0)
        search = dtune.search.Random(seed=0)
    dtune.run(trainable, param_space=space, metric=metric, mode=mode, num_samples=9, storage=sys.argv[1],
              scheduler=scheduler, search=search, seed=0, verbose=0, max_concurrent=2)
    """
)


def _durable_results(experiment: Path) -> int:
    try:
        db = sqlite3.connect(f"file:{experiment / 'experiment.db'}?mode=ro", uri=True)
        try:
            return int(db.execute("SELECT COUNT(*) FROM results").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:
        return 0


@pytest.mark.parametrize("kind", ["hyperband+bohb", "asha+tpe", "pbt+random"])
def test_scheduler_and_searcher_state_survive_driver_sigkill(tmp_path, kind):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    experiment = tmp_path / "exp"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen([sys.executable, str(script), str(experiment), kind], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while _durable_results(experiment) < 12:  # HyperBand's whole bracket takes ~21
        assert driver.poll() is None, driver.communicate()
        assert time.monotonic() < deadline, "the driver never got midway"
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait(10)
    results = dtune.resume(experiment, verbose=0)
    assert len(results) == 9 and all(t.status is TrialStatus.TERMINATED for t in results)
    first = [t.lineage[0]["old_config"] if t.lineage else t.config for t in results]  # before PBT
    configs = [json.dumps(config, sort_keys=True) for config in first]
    assert len(set(configs)) == 9  # a searcher restarted from scratch would repeat its first configs
    if kind == "hyperband+bohb":  # the bracket of 9 still halves: exactly one trial reaches max_t
        assert sum(t.metrics["training_iteration"] >= 9 for t in results) == 1
