"""A failing worker takes its group down quickly, with an error naming its rank."""

from __future__ import annotations

import pytest

import dtune
from dtune import train
from dtune.tune.trial import TrialStatus
from tests.train import _loops as L


@pytest.mark.parametrize(
    ("how", "message"), [("raise", "ValueError: rank-specific failure"), ("sigkill", "SIGKILL")]
)
def test_failed_rank_stops_the_group(how, message):
    with pytest.raises(train.WorkerGroupError, match=f"rank 1 of 2: (.|\\n)*{message}"):
        train.launch(L.failing, workers=2, config={"bad_rank": 1, "how": how})


def test_hung_collective_is_bounded_by_the_timeout():
    with pytest.raises(train.WorkerGroupError, match="rank 0 of 2: (.|\\n)*did not complete within 3 s"):
        train.launch(L.failing, workers=2, config={"bad_rank": 1, "how": "hang"}, collective_timeout_s=3)


def test_group_trial_failure_is_retried_and_then_reported(tmp_path):
    results = dtune.run(
        L.failing, param_space={"bad_rank": 1, "how": "sigkill"}, metric="x", mode="max",
        resources=dtune.Resources(workers=2), storage=tmp_path / "exp", verbose=0, max_failures=1,
    )  # fmt: skip
    (trial,) = results.trials
    assert trial.status is TrialStatus.ERROR and "rank 1 of 2" in trial.error and "SIGKILL" in trial.error


def test_stop_reaches_every_rank_at_the_same_report(tmp_path):
    results = dtune.run(
        L.digits_like, param_space={"lr": 0.1, "epochs": 50}, metric="acc", mode="max",
        resources=dtune.Resources(workers=2), stop={"training_iteration": 2},
        storage=tmp_path / "exp", verbose=0,
    )  # fmt: skip
    (trial,) = results.trials
    assert trial.status is TrialStatus.TERMINATED and 2 <= trial.metrics["training_iteration"] < 50
