"""A search over 2-worker trials with ASHA survives a driver SIGKILL and resumes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dtune
from dtune.tune.trial import TrialStatus

REPO = Path(__file__).resolve().parents[2]

DRIVER = textwrap.dedent(
    """
    import sys
    import dtune
    from tests.train._loops import digits_like

    dtune.run(
        digits_like,
        param_space={"lr": dtune.uniform(0.05, 0.5), "epochs": 6, "sleep": 0.15},
        metric="acc", mode="max", num_samples=4, storage=sys.argv[1], seed=0, verbose=0,
        resources=dtune.Resources(workers=2),
        scheduler=dtune.schedulers.ASHA(max_t=6, grace_period=2, reduction_factor=2),
    )
    """
)


def test_two_worker_search_resumes_after_driver_sigkill(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    experiment = tmp_path / "exp"
    driver = subprocess.Popen(
        [sys.executable, str(script), str(experiment)], env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    deadline = time.monotonic() + 120
    while True:
        assert driver.poll() is None, "the driver ended before it could be killed"
        assert time.monotonic() < deadline, "the search never got midway"
        try:
            db = sqlite3.connect(f"file:{experiment / 'experiment.db'}?mode=ro", uri=True)
            (midway,) = db.execute(
                "SELECT COUNT(*) FROM trials WHERE status = 'TERMINATED' OR checkpoint_iteration >= 2"
            ).fetchone()
            db.close()
            if midway >= 2:
                break
        except sqlite3.Error:
            pass
        time.sleep(0.1)
    driver.send_signal(signal.SIGKILL)
    driver.wait(10)
    results = dtune.resume(experiment, verbose=0)
    assert len(results) == 4 and all(t.status is TrialStatus.TERMINATED for t in results)
    for trial in results:  # ASHA may stop trials early; what ran is complete and not duplicated
        iterations = [r["training_iteration"] for r in trial.metrics_history]
        assert iterations == list(range(1, len(iterations) + 1)) and len(iterations) >= 2
        assert all(r["world"] == 2 for r in trial.metrics_history)
    assert max(len(t.metrics_history) for t in results) == 6, "the best trial reaches max_t"
