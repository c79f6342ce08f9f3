"""End-to-end tests of dtune.run with real worker processes."""

from __future__ import annotations

import itertools
import math
import threading
from pathlib import Path

import pytest

import dtune
from dtune.tune.runner import MetricNotReportedError
from dtune.tune.schedulers import Decision, Scheduler, TrialSuggestion
from dtune.tune.trial import TrialStatus
from tests.tune import _trainables as T


def _run(trainable, tmp_path, **kwargs):
    kwargs.setdefault("param_space", {"x": dtune.uniform(0, 1)})
    kwargs.setdefault("metric", "score")
    kwargs.setdefault("mode", "max")
    return dtune.run(trainable, storage=tmp_path / "exp", verbose=0, seed=0, **kwargs)


def test_search_finds_best_and_records_everything(tmp_path):
    results = _run(T.quadratic, tmp_path, metric="loss", mode="min", num_samples=12)
    assert len(results) == 12 and all(t.status is TrialStatus.TERMINATED for t in results)
    best = results.best
    assert best.metrics["loss"] == min(t.metrics["loss"] for t in results)
    assert [r["training_iteration"] for r in best.metrics_history] == [1, 2, 3]
    frame = results.dataframe()
    assert len(frame) == 12 and {"config/x", "loss", "trial_id"} <= set(frame.columns)
    assert results.get_best(scope="all").trial_id == best.trial_id


def test_class_trainable_checkpoints_on_schedule_and_at_end(tmp_path):
    results = _run(T.Counter, tmp_path, param_space={"scale": dtune.grid([1, 10])}, metric="n")
    assert sorted(t.metrics["n"] for t in results) == [5, 50]
    checkpoint = results.best.checkpoint
    assert checkpoint is not None and Path(checkpoint.path, "n").read_text() == "5"
    assert len(list(Path(results.best.path).glob("checkpoint_*"))) == 3  # steps 2, 4 and 5 (done)


def test_stop_criterion_reaches_a_trial_at_its_next_report_and_frees_the_slot(tmp_path):
    results = _run(T.forever, tmp_path, num_samples=3, max_concurrent=1, stop={"training_iteration": 5})
    assert all(t.status is TrialStatus.TERMINATED for t in results)
    # with a stop criterion every report waits for the driver's decision: no overshoot
    assert all(t.metrics["training_iteration"] == 5 for t in results)


class StopInBandAtThird(Scheduler):
    def decision_points(self, trial):
        return frozenset({3})

    def on_result(self, trial, result):
        return Decision.STOP if result["training_iteration"] >= 3 else Decision.CONTINUE


@pytest.mark.parametrize("workers", [1, 2])
def test_a_decision_point_holds_the_trial_until_the_scheduler_answers(tmp_path, workers):
    results = _run(T.forever, tmp_path, num_samples=2, scheduler=StopInBandAtThird(),
                   resources=dtune.Resources(workers=workers))  # fmt: skip
    assert [t.metrics["training_iteration"] for t in results] == [3, 3]


class StopsARunningTrial(Scheduler):
    def choose_next(self, trials):
        return TrialSuggestion.stop(trials[0])


def test_ending_a_trial_that_is_not_paused_is_refused(tmp_path):
    with pytest.raises(ValueError, match="TrialSuggestion.stop ends PAUSED trials only"):
        _run(
            T.checkpointed,
            tmp_path,
            param_space={"steps": 5, "fail_at": 2},
            max_failures=1,
            scheduler=StopsARunningTrial(),
        )  # fmt: skip  (the retried trial waits as PENDING)


class StopAtFirst(Scheduler):
    def on_result(self, trial, result):
        return Decision.STOP


def test_scheduler_stop_is_not_an_error(tmp_path):
    results = _run(T.forever, tmp_path, num_samples=2, scheduler=StopAtFirst())
    assert [t.status for t in results] == [TrialStatus.TERMINATED] * 2


class ReturnsString(Scheduler):
    def on_result(self, trial, result):
        return "STOP"


def test_decisions_must_be_the_enum(tmp_path):
    with pytest.raises(TypeError, match="must return a dtune.schedulers.Decision"):
        _run(T.forever, tmp_path, num_samples=1, scheduler=ReturnsString())


def test_error_is_stored_with_traceback(tmp_path):
    results = _run(T.checkpointed, tmp_path, param_space={"steps": 5, "fail_at": 2})
    (trial,) = results.errors
    assert "RuntimeError: planned failure at step 2" in trial.error
    assert trial.metrics["training_iteration"] == 2


@pytest.mark.parametrize("how", ["raise", "sigkill"])
def test_failed_trial_is_retried_from_its_last_checkpoint(tmp_path, how):
    results = _run(
        T.checkpointed, tmp_path, param_space={"steps": 5, "fail_at": 3, "how": how}, max_failures=1
    )
    (trial,) = results.trials
    assert trial.status is TrialStatus.TERMINATED
    assert [r["training_iteration"] for r in trial.metrics_history] == [1, 2, 3, 4, 5]
    assert Path(trial.path, "starts").read_text().split() == ["0", "3"]
    if how == "sigkill":
        assert "SIGKILL" in trial.error


def test_trainable_that_never_reports_is_an_error_naming_the_cause(tmp_path):
    results = _run(T.never_reports, tmp_path, num_samples=1, max_failures=3)
    (trial,) = results.errors
    assert "without calling dtune.report()" in trial.error


def test_returned_dict_is_the_final_report(tmp_path):
    results = _run(T.returns_dict, tmp_path, num_samples=3)
    assert all(t.metrics["score"] == 2 * t.config["x"] for t in results)


def test_metric_never_reported_names_the_reported_keys(tmp_path):
    with pytest.raises(MetricNotReportedError, match="'score' was never reported.*accuracy, loss"):
        _run(T.wrong_metric, tmp_path, num_samples=4)


def test_non_finite_metrics_are_stored_ranked_worst_and_warned_once(tmp_path):
    with pytest.warns(RuntimeWarning, match="non-finite") as caught:
        results = _run(T.reports_nan, tmp_path, metric="loss", mode="min", num_samples=10)
    assert len([w for w in caught if "non-finite" in str(w.message)]) == 1
    assert any(math.isnan(t.metrics["loss"]) for t in results)
    assert not math.isnan(results.best.metrics["loss"])


def test_context_names_the_trial(tmp_path):
    results = _run(T.record_context, tmp_path, num_samples=2)
    for trial in results:
        assert Path(trial.path, "context").read_text() == f"{trial.trial_id} {trial.config['x']}"


def test_concurrency_is_bounded_by_max_concurrent(tmp_path):
    results = _run(T.timed, tmp_path, num_samples=4, max_concurrent=1, metric="end")
    spans = sorted((t.metrics["start"], t.metrics["end"]) for t in results)
    assert all(prev_end <= start for (_, prev_end), (start, _) in itertools.pairwise(spans))


def test_unpicklable_trainable_says_what_could_not_be_pickled(tmp_path):
    lock = threading.Lock()

    def uses_lock(config):
        with lock:
            dtune.report({"score": 1})

    with pytest.raises(TypeError, match="'uses_lock' must be sent to worker processes.*lock"):
        _run(uses_lock, tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"mode": "maximize"}, ValueError, "`mode` is 'maximize', but must be 'min' or 'max'"),
        ({"num_samples": 0}, ValueError, "`num_samples` is 0, but must be an integer >= 1"),
        (
            {"param_space": {"x": dtune.grid([1, 2])}, "search": dtune.search.Random()},
            ValueError,
            "cannot enumerate a grid",
        ),
        ({"param_space": {"x": dtune.uniform(2, 1)}}, ValueError, r"param_space\['x'\]"),
        ({"max_failures": -1}, ValueError, "`max_failures` is -1"),
        ({"metric": ""}, TypeError, "`metric`"),
    ],
)
def test_bad_arguments_fail_before_anything_runs(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        _run(T.quadratic, tmp_path, **kwargs)
    assert not (tmp_path / "exp").exists()


def test_report_outside_a_trial_says_where_to_call_it():
    with pytest.raises(RuntimeError, match=r"dtune.report\(\) was called outside a trial"):
        dtune.report({"x": 1})
    with pytest.raises(RuntimeError, match="outside a trial"):
        dtune.get_checkpoint()


def test_storage_holding_an_experiment_is_refused_unless_resumed(tmp_path):
    _run(T.quadratic, tmp_path, metric="loss", mode="min", num_samples=2)
    with pytest.raises(ValueError, match="already holds a dtune experiment.*resume=True"):
        _run(T.quadratic, tmp_path, metric="loss", mode="min", num_samples=2)
    with pytest.raises(ValueError, match="different experiment.*metric, mode"):
        _run(T.quadratic, tmp_path, metric="score", mode="max", num_samples=2, resume=True)
    again = _run(T.quadratic, tmp_path, metric="loss", mode="min", num_samples=2, resume=True)
    assert len(again) == 2  # finished trials are not rerun


class PauseThenExploit(Scheduler):
    """Pauses every trial at iteration 2; trial 00001 then continues from 00000's checkpoint."""

    def on_result(self, trial, result):
        return Decision.PAUSE if result["training_iteration"] == 2 else Decision.CONTINUE

    def choose_next(self, trials):
        paused = {t.trial_id: t for t in trials if t.status is TrialStatus.PAUSED}
        if len(paused) < 2:
            return super().choose_next([t for t in trials if t.status is TrialStatus.PENDING])
        donor, trial = paused["00000"], paused["00001"]
        self.choose_next = super().choose_next  # only once
        return TrialSuggestion.resume(trial, config={**trial.config, "x": 100.0}, donor=donor)


def test_paused_trials_resume_and_can_continue_from_a_donor_checkpoint(tmp_path):
    results = _run(
        T.checkpointed, tmp_path, param_space={"steps": 8, "sleep": 0.05, "x": dtune.grid([0.0, 1.0])},
        scheduler=PauseThenExploit(), max_concurrent=2,
    )  # fmt: skip
    by_id = {t.trial_id: t for t in results}
    assert all(t.status is TrialStatus.TERMINATED for t in results)
    assert [r["training_iteration"] for r in by_id["00000"].metrics_history] == list(range(1, 9))
    exploited = by_id["00001"]
    (entry,) = exploited.lineage
    assert entry["donor"] == "00000" and entry["config"]["x"] == 100.0 and entry["old_config"]["x"] == 1.0
    k = entry["donor_iteration"]  # the pause lands at iteration 2 or a little later
    tail = [r for r in exploited.metrics_history if r["score"] >= 100]
    assert [r["training_iteration"] for r in tail] == list(range(k + 1, 9))
    assert all(r["score"] == 99 + r["training_iteration"] for r in tail)
    assert Path(exploited.path, "starts").read_text().split() == ["0", str(k)]
