"""A driver killed with SIGKILL, or stopped with Ctrl-C, leaves an experiment that resumes."""

from __future__ import annotations

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
from dtune.tune.trial import TrialStatus

REPO = Path(__file__).resolve().parents[2]

DRIVER = textwrap.dedent(
    """
    import sys
    import dtune
    from tests.tune._trainables import checkpointed

    dtune.run(
        checkpointed,
        param_space={"x": dtune.uniform(0, 1), "steps": 8, "sleep": 0.08},
        metric="score", mode="max", num_samples=6, storage=sys.argv[1], seed=0, verbose=1,
    )
    """
)


def _start_driver(tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    experiment = tmp_path / "exp"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen(
        [sys.executable, str(script), str(experiment)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return driver, experiment


def _wait_until_midway(driver: subprocess.Popen[str], experiment: Path, timeout: float = 60) -> None:
    """Until some trials finished and others have durable results but did not finish."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert driver.poll() is None, driver.communicate()
        try:
            db = sqlite3.connect(f"file:{experiment / 'experiment.db'}?mode=ro", uri=True)
            done = db.execute("SELECT COUNT(*) FROM trials WHERE status = 'TERMINATED'").fetchone()[0]
            busy = db.execute(
                "SELECT COUNT(*) FROM trials WHERE status = 'RUNNING' AND checkpoint_iteration >= 2"
            ).fetchone()[0]
            db.close()
            if done >= 2 and busy >= 1:
                return
        except sqlite3.Error:
            pass
        time.sleep(0.05)
    pytest.fail("the driver never got midway")


def _durable_state(experiment: Path) -> dict[str, tuple[str, int]]:
    """Each trial's status and checkpoint iteration as the store holds them after the driver died."""
    db = sqlite3.connect(experiment / "experiment.db")
    rows = db.execute("SELECT trial_id, status, checkpoint_iteration FROM trials").fetchall()
    db.close()
    return {trial_id: (status, iteration) for trial_id, status, iteration in rows}


def _check_resumed(experiment: Path) -> None:
    before = _durable_state(experiment)
    results = dtune.resume(experiment, verbose=0)
    assert len(results) == 6
    assert all(t.status is TrialStatus.TERMINATED for t in results)
    restarted = 0
    for trial in results:
        assert [r["training_iteration"] for r in trial.metrics_history] == list(range(1, 9)), trial.trial_id
        starts = [int(s) for s in Path(trial.path, "starts").read_text().split()]
        assert starts[0] == 0 and len(starts) <= 2
        status, checkpoint_iteration = before.get(trial.trial_id, ("", 0))
        if status == "TERMINATED":
            assert len(starts) == 1, "finished trials are not rerun"
        elif len(starts) == 2:
            assert starts[1] == checkpoint_iteration, "an unfinished trial continues from its last checkpoint"
            restarted += starts[1] >= 2
    assert restarted >= 1
    finished_before = [t for t in results if len(Path(t.path, "starts").read_text().split()) == 1]
    assert len(finished_before) >= 2, "finished trials are not rerun"


def test_driver_sigkill_then_resume_loses_nothing(tmp_path):
    driver, experiment = _start_driver(tmp_path)
    _wait_until_midway(driver, experiment)
    driver.send_signal(signal.SIGKILL)
    driver.wait(10)
    _check_resumed(experiment)


def test_ctrl_c_stops_cleanly_and_resumes(tmp_path):
    driver, experiment = _start_driver(tmp_path)
    _wait_until_midway(driver, experiment)
    driver.send_signal(signal.SIGINT)
    _, stderr = driver.communicate(timeout=30)
    assert driver.returncode != 0
    assert f"dtune resume {experiment}" in stderr
    db = sqlite3.connect(experiment / "experiment.db")
    statuses = {row[0] for row in db.execute("SELECT status FROM trials")}
    db.close()
    assert "RUNNING" not in statuses
    _check_resumed(experiment)
