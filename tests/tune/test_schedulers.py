"""Schedulers on their own: the shared contract, then each algorithm against hand-computed cases.

``FakeRunner`` drives a scheduler (and optionally a searcher) exactly as ``TrialRunner`` does,
minus the processes: it fills free slots through ``choose_next`` and then the searcher, feeds
results, acts on decisions (a pause or stop lands ``lag`` results late, as over a socket),
resumes trials from their checkpoint or a donor's, and raises if trials wait while none runs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import pytest

import dtune
from dtune.tune.schedulers import (
    ASHA,
    FIFO,
    PBT,
    Decision,
    HyperBand,
    MedianStopping,
    Scheduler,
    TrialSuggestion,
)
from dtune.tune.schedulers._pbt import explore
from dtune.tune.search import Random, Searcher
from dtune.tune.trial import Trial, TrialStatus


def curve(config: dict[str, Any], t: int, state: float) -> tuple[float, float]:
    """loss_t = (x - 0.3)^2 + 1 / (t + 1); the state is unused."""
    return (config["x"] - 0.3) ** 2 + 1 / (t + 1), state


class FakeRunner:
    def __init__(
        self,
        scheduler: Scheduler,
        configs: list[dict[str, Any]] | Searcher,
        *,
        slots: int = 2,
        max_t: int = 100,
        objective: Callable[[dict[str, Any], int, float], tuple[float, float]] = curve,
        lag: int = 0,
        seed: int = 0,
        checkpoints: bool = True,
    ) -> None:
        self.scheduler, self.slots, self.max_t, self.objective, self.lag = (
            scheduler,
            slots,
            max_t,
            objective,
            lag,
        )
        self.searcher = configs if isinstance(configs, Searcher) else None
        self.configs = list(configs) if isinstance(configs, list) else []
        self.num_samples = len(self.configs) if self.searcher is None else 10**9
        self.checkpoints = checkpoints
        self.rng = random.Random(seed)
        self.trials: list[Trial] = []
        self.waiting: list[Trial] = []
        self.running: dict[str, int] = {}  # trial -> results still to emit before a pause/stop lands
        self.pos: dict[str, int] = {}  # the iteration a running trial has reached
        self.state: dict[str, float] = {}  # the trial's model, as its checkpoint holds it
        self.saved: dict[str, tuple[int, float]] = {}  # trial -> (iteration, state) of its checkpoint
        self.decisions: list[tuple[str, int, Decision]] = []
        self.points: dict[str, bool | frozenset[int]] = {}  # reports decided in-band, per trial
        self.ended_while_paused: list[str] = []
        self.budget = 0
        scheduler.set_properties("loss", "min")

    def _new_trial(self) -> Trial | None:
        if len(self.trials) >= self.num_samples:
            return None
        trial_id = f"{len(self.trials):05d}"
        if self.searcher is not None:
            if self.searcher.is_finished:
                return None
            config = self.searcher.suggest(trial_id)
            if config is None:
                if not self.running:
                    raise RuntimeError("searcher returned None with nothing running")
                return None
        else:
            config = self.configs[len(self.trials)]
        trial = Trial(trial_id, dict(config))
        self.trials.append(trial)
        self.scheduler.on_trial_add(trial)
        return trial

    def _start(self, s: TrialSuggestion) -> None:
        trial = s.trial
        if trial in self.waiting:
            self.waiting.remove(trial)
        if s.donor is not None:
            assert s.donor.checkpoint is not None
            trial.checkpoint, trial.checkpoint_iteration = s.donor.checkpoint, s.donor.checkpoint_iteration
            self.saved[trial.trial_id] = self.saved[s.donor.trial_id]
            trial.extra.setdefault("lineage", []).append({"donor": s.donor.trial_id, "config": s.config})
        if s.config is not None:
            trial.config = dict(s.config)
        iteration, state = self.saved.get(trial.trial_id, (0, 0.0)) if trial.checkpoint else (0, 0.0)
        self.pos[trial.trial_id], self.state[trial.trial_id] = iteration, state
        trial.status, trial.stop_requested, trial.pause_requested = TrialStatus.RUNNING, False, False
        self.running[trial.trial_id] = -1
        self.points[trial.trial_id] = self.scheduler.decision_points(trial)

    def fill(self) -> None:
        while len(self.running) < self.slots:
            s = self.scheduler.choose_next(self.waiting) if self.waiting else None
            if s is None:
                trial = self._new_trial()
                s = None if trial is None else TrialSuggestion.start(trial)
            if s is None:
                return
            assert isinstance(s, TrialSuggestion)
            if s.end:  # a paused trial ends where it is, taking no slot
                assert s.trial.status is TrialStatus.PAUSED
                self.waiting.remove(s.trial)
                self.ended_while_paused.append(s.trial.trial_id)
                self.running[s.trial.trial_id] = 0
                self._end(s.trial, TrialStatus.TERMINATED)
                continue
            self._start(s)

    def step(self, trial: Trial) -> None:
        t = self.pos[trial.trial_id] = self.pos[trial.trial_id] + 1
        loss, self.state[trial.trial_id] = self.objective(trial.config, t, self.state[trial.trial_id])
        result = {"loss": loss, "training_iteration": t}
        self.budget += 1
        trial.last_result, trial.num_results = result, trial.num_results + 1
        if self.checkpoints:
            trial.checkpoint, trial.checkpoint_iteration = f"ckpt/{trial.trial_id}/{t}", t
            self.saved[trial.trial_id] = (t, self.state[trial.trial_id])
        pending = self.running[trial.trial_id]
        if pending < 0:  # no decision on its way: this result is decided
            if self.searcher is not None:
                self.searcher.on_result(trial.trial_id, result)
            decision = self.scheduler.on_result(trial, result)
            assert isinstance(decision, Decision)
            self.decisions.append((trial.trial_id, t, decision))
            if decision is not Decision.CONTINUE:
                trial.stop_requested = decision is Decision.STOP
                trial.pause_requested = decision is Decision.PAUSE
                points = self.points[trial.trial_id]
                in_band = points is True or (isinstance(points, frozenset) and t in points)
                self.running[trial.trial_id] = pending = 0 if in_band else self.lag
            elif t >= self.max_t:
                self._end(trial, TrialStatus.TERMINATED)
                return
        else:
            self.running[trial.trial_id] = pending = pending - 1
        if pending == 0 or (pending > 0 and t >= self.max_t):
            if trial.pause_requested and t < self.max_t:
                del self.running[trial.trial_id]
                trial.status = TrialStatus.PAUSED
                self.waiting.append(trial)
            else:
                self._end(trial, TrialStatus.TERMINATED)

    def _end(self, trial: Trial, status: TrialStatus) -> None:
        del self.running[trial.trial_id]
        trial.status = status
        if status is TrialStatus.ERROR:
            self.scheduler.on_trial_error(trial)
        else:
            self.scheduler.on_trial_complete(trial, trial.last_result)
        if self.searcher is not None:
            self.searcher.on_complete(trial.trial_id, trial.last_result, error=status is TrialStatus.ERROR)

    def crash(self, scheduler: Scheduler) -> None:
        """The driver died: running trials restart from their checkpoints under ``scheduler``."""
        for trial_id in list(self.running):
            trial = self.by_id(trial_id)
            del self.running[trial_id]
            trial.status = TrialStatus.PENDING
            self.waiting.insert(0, trial)
        self.scheduler = scheduler

    def run(self, steps: int | None = None) -> FakeRunner:
        """Run to the end (or for ``steps`` results); raise if trials wait while none runs."""
        for _ in range(steps or 100_000):
            self.fill()
            if not self.running:
                if self.waiting:
                    raise RuntimeError(f"{len(self.waiting)} trials wait while none runs")
                return self
            trial = self.by_id(self.rng.choice(sorted(self.running)))
            fail_at = trial.config.get("fail_at")
            if fail_at is not None and self.pos[trial.trial_id] + 1 == fail_at:
                self._end(trial, TrialStatus.ERROR)
            else:
                self.step(trial)
        if steps is None:
            raise RuntimeError("did not finish")
        return self

    def by_id(self, trial_id: str) -> Trial:
        return next(t for t in self.trials if t.trial_id == trial_id)


def _configs(n: int, seed: int = 0, **extra: Any) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"x": rng.random(), "lr": 0.01, **extra} for _ in range(n)]


SCHEDULERS: dict[str, Callable[[], Scheduler]] = {
    "fifo": FIFO,
    "asha": lambda: ASHA(max_t=27, grace_period=1, reduction_factor=3),
    "median": lambda: MedianStopping(grace_period=2, min_samples=2),
    "hyperband": lambda: HyperBand(max_t=27, reduction_factor=3),
    "pbt": lambda: PBT(4, {"lr": dtune.loguniform(1e-3, 1.0)}, seed=0),
    "pbt-synch": lambda: PBT(4, {"lr": dtune.loguniform(1e-3, 1.0)}, synch=True, seed=0),
}


# -- the contract every scheduler keeps ---------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("lag", [0, 2])
def test_every_scheduler_keeps_the_contract(name, lag):
    """add, result, complete, error, pause/resume; decisions are the Enum; no trial is left waiting."""
    configs = _configs(12)
    configs[3]["fail_at"] = 2  # errors after one result
    runner = FakeRunner(SCHEDULERS[name](), configs, slots=3, max_t=27, lag=lag).run()
    assert all(isinstance(d, Decision) for _, _, d in runner.decisions)
    statuses = [t.status for t in runner.trials]
    assert statuses.count(TrialStatus.ERROR) == 1 and statuses.count(TrialStatus.TERMINATED) == 11
    assert not runner.waiting


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_state_round_trips_mid_run(name):
    """After a driver crash, a scheduler restored from get_state() decides as the original does."""

    def run(restore: bool) -> list[tuple[str, int, Decision]]:
        runner = FakeRunner(SCHEDULERS[name](), _configs(12, seed=1), slots=2, max_t=27, seed=3)
        runner.run(steps=60)
        scheduler = runner.scheduler
        if restore:
            scheduler = SCHEDULERS[name]()
            scheduler.set_properties("loss", "min")
            scheduler.set_state(runner.scheduler.get_state())
        runner.crash(scheduler)
        return runner.run().decisions

    assert run(restore=True) == run(restore=False)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_resumes_a_paused_trial_from_its_checkpoint(name):
    """A trial paused (by the scheduler or a Ctrl-C) is handed back by choose_next, as it is."""
    scheduler = SCHEDULERS[name]()
    scheduler.set_properties("loss", "min")
    trial = Trial("00000", {"x": 0.5, "lr": 0.01})
    scheduler.on_trial_add(trial)
    trial.status = TrialStatus.RUNNING
    decision = scheduler.on_result(trial, {"loss": 1.0, "training_iteration": 1})
    assert isinstance(decision, Decision)
    trial.status, trial.checkpoint, trial.checkpoint_iteration = TrialStatus.PAUSED, "ckpt/00000/1", 1
    suggestion = scheduler.choose_next([trial])
    assert suggestion == TrialSuggestion.resume(trial)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (
            lambda: ASHA(max_t=10, reduction_factor=1),
            "The value of `reduction_factor` is 1, but must be >= 2.",
        ),
        (lambda: ASHA(max_t=10, grace_period=20), "`grace_period` is 20, but must be <= 10"),
        (lambda: ASHA(max_t=0), "`max_t` is 0, but must be > 0"),
        (lambda: ASHA(brackets=0), "`brackets` is 0, but must be >= 1"),
        (lambda: HyperBand(max_t=81, reduction_factor=1.5), "`reduction_factor` is 1.5, but must be >= 2"),
        (lambda: MedianStopping(min_samples=0), "`min_samples` is 0, but must be >= 1"),
        (lambda: PBT(0, {"lr": [1, 2]}), "`perturbation_interval` is 0, but must be > 0"),
        (
            lambda: PBT(2, {"lr": [1, 2]}, quantile_fraction=0.7),
            "`quantile_fraction` is 0.7, but must be <= 0.5",
        ),
        (lambda: PBT(2, {"lr": []}), r"hyperparam_mutations\['lr'\] is an empty list"),
        (lambda: ASHA(mode="maximize"), "`mode` is 'maximize', but must be 'min' or 'max'"),
    ],
)
def test_bad_arguments_fail_at_construction(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_bad_argument_types_fail_at_construction():
    with pytest.raises(TypeError, match="`brackets` is 1.5, but must be an integer"):
        ASHA(brackets=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="hyperparam_mutations"):
        PBT(2, None)
    with pytest.raises(TypeError, match=r"hyperparam_mutations\['lr'\] is a Grid"):
        PBT(2, {"lr": dtune.grid([1, 2])})


# -- ASHA ---------------------------------------------------------------------------------------------
def _feed(scheduler: Scheduler, trial: Trial, t: int, loss: float) -> Decision:
    return scheduler.on_result(trial, {"loss": loss, "training_iteration": t})


def test_asha_rungs_and_promotions_by_hand():
    asha = ASHA(max_t=10, grace_period=1, reduction_factor=2, metric="loss", mode="min")
    assert asha.rungs() == [1, 2, 4, 8]
    trials = [Trial(f"t{i}", {}) for i in range(6)]
    for trial in trials:
        asha.on_trial_add(trial)
    # rung 1: keep the best max(1, n // 2) of the n values recorded so far (itself included)
    losses = [5.0, 4.0, 6.0, 3.0, 4.5, 7.0]
    expected = [
        Decision.CONTINUE,  # n=1, keep 1: alone, it is the best
        Decision.CONTINUE,  # n=2, keep 1: 4.0 beats 5.0
        Decision.STOP,  # n=3, keep 1: 6.0 is not the best
        Decision.CONTINUE,  # n=4, keep 2: 3.0 is first
        Decision.STOP,  # n=5, keep 2: 4.5 is third (3.0, 4.0 better)
        Decision.STOP,  # n=6, keep 3: 7.0 is last
    ]
    assert [_feed(asha, tr, 1, v) for tr, v in zip(trials, losses, strict=True)] == expected
    assert asha.recorded(1) == {f"t{i}": -v for i, v in enumerate(losses)}
    # rung 2 is judged among the values recorded at rung 2 only
    assert _feed(asha, trials[0], 2, 4.0) is Decision.CONTINUE  # n=1
    assert _feed(asha, trials[1], 2, 3.9) is Decision.CONTINUE  # n=2, best
    assert _feed(asha, trials[3], 2, 3.95) is Decision.STOP  # n=3, keep 1: second
    assert _feed(asha, trials[0], 3, 1.0) is Decision.CONTINUE  # between rungs
    assert _feed(asha, trials[1], 10, 1.0) is Decision.STOP  # max_t


def test_asha_decides_in_band_at_its_rungs_only():
    asha = ASHA(max_t=100, grace_period=1, reduction_factor=3)
    trial = Trial("a", {})
    assert asha.decision_points(trial) == frozenset({1, 3, 9, 27, 81, 100})
    assert ASHA(max_t=10, grace_period=1.5, reduction_factor=2).decision_points(trial) == {2, 3, 6, 10}
    assert ASHA(max_t=10, time_attr="time_total_s").decision_points(trial) is True


def test_asha_ties_go_to_the_newcomer_and_max_mode_ranks_upwards():
    asha = ASHA(max_t=10, grace_period=1, reduction_factor=2, metric="acc", mode="max")
    a, b, c = Trial("a", {}), Trial("b", {}), Trial("c", {})
    for trial in (a, b, c):
        asha.on_trial_add(trial)
    assert asha.on_result(a, {"acc": 0.5, "training_iteration": 1}) is Decision.CONTINUE
    assert asha.on_result(b, {"acc": 0.5, "training_iteration": 1}) is Decision.CONTINUE  # tie
    assert asha.on_result(c, {"acc": 0.4, "training_iteration": 1}) is Decision.STOP


def test_asha_brackets_are_drawn_from_an_owned_generator():
    def draws(seed: int) -> list[int]:
        asha = ASHA(max_t=81, brackets=3, seed=seed)
        trials = [Trial(str(i), {}) for i in range(40)]
        for trial in trials:
            asha.on_trial_add(trial)
        return [asha._bracket[t.trial_id] for t in trials]

    assert draws(1) == draws(1) and set(draws(1)) == {0, 1, 2}
    asha = ASHA(max_t=81, grace_period=1, reduction_factor=3, brackets=3)
    assert [asha.rungs(s) for s in range(3)] == [[1, 3, 9, 27], [3, 9, 27], [9, 27]]


def test_asha_stops_most_trials_early_on_the_curve():
    runner = FakeRunner(ASHA(max_t=27), _configs(60), slots=4, max_t=27).run()
    reached = [t.iteration for t in runner.trials]
    assert sum(r >= 27 for r in reached) <= 8 and sum(r == 1 for r in reached) >= 30
    best = min(runner.trials, key=lambda t: t.last_result["loss"])
    assert best.iteration == 27 and abs(best.config["x"] - 0.3) < 0.1


# -- median stopping ----------------------------------------------------------------------------------
def test_median_rule_by_hand():
    median = MedianStopping(grace_period=2, min_samples=2, metric="loss", mode="min")
    a, b, c = Trial("a", {}), Trial("b", {}), Trial("c", {})
    for trial, losses in ((a, [4.0, 2.0, 1.0]), (b, [6.0, 4.0, 2.0])):
        for t, loss in enumerate(losses, 1):
            assert _feed(median, trial, t, loss) is Decision.CONTINUE  # too few others
    assert _feed(median, c, 1, 9.0) is Decision.CONTINUE  # within the grace period
    # at t=2 the others' running means are a: (4+2)/2 = 3 and b: (6+4)/2 = 5, median 4;
    # c's best so far is 4.5: worse than 4, so it stops
    assert median.median_of_others("c", 2) == pytest.approx(-4.0)
    assert _feed(median, c, 2, 4.5) is Decision.STOP
    d = Trial("d", {})
    _feed(median, d, 1, 3.5)
    assert _feed(median, d, 2, 5.0) is Decision.CONTINUE  # its best (3.5) beats the median


def test_median_uses_other_trials_that_reached_the_same_time():
    median = MedianStopping(grace_period=1, min_samples=1, metric="loss", mode="min")
    a, b = Trial("a", {}), Trial("b", {})
    _feed(median, a, 1, 1.0)
    assert median.median_of_others("b", 2) is None  # a has not reached t=2
    assert _feed(median, b, 2, 100.0) is Decision.CONTINUE


# -- HyperBand ----------------------------------------------------------------------------------------
def test_hyperband_bracket_sizes_match_the_paper():
    hb = HyperBand(max_t=81, reduction_factor=3)
    assert hb.plan() == [
        (81, [1, 3, 9, 27, 81]),
        (34, [3, 9, 27, 81]),
        (15, [9, 27, 81]),
        (8, [27, 81]),
        (5, [81]),
    ]
    rung_sizes = []
    for n, milestones in hb.plan():
        sizes = [n]
        for _ in milestones[1:]:
            sizes.append(hb.keep(sizes[-1]))
        rung_sizes.append(sizes)
    assert rung_sizes == [[81, 27, 9, 3, 1], [34, 11, 3, 1], [15, 5, 1], [8, 2], [5]]


@pytest.mark.parametrize("slots", [2, 3, 5])
@pytest.mark.parametrize("lag", [0, 1, 3])
def test_hyperband_bracket_is_exact_successive_halving(slots, lag):
    """9 trials in the first bracket of max_t=9: the best 3 reach rung 1 (t=3), the best of them t=9."""
    configs = _configs(9, seed=slots + 10 * lag)
    hb = HyperBand(max_t=9)
    runner = FakeRunner(hb, configs, slots=slots, max_t=9, lag=lag).run()
    by_x = [t.trial_id for t in sorted(runner.trials, key=lambda t: abs(t.config["x"] - 0.3))]
    assert {t.trial_id for t in runner.trials if hb.rung(t.trial_id) >= 1} == set(by_x[:3])
    assert [t.trial_id for t in runner.trials if hb.rung(t.trial_id) == 2] == [by_x[0]]
    assert runner.by_id(by_x[0]).iteration == 9


def test_hyperband_ends_paused_losers_without_running_them_again():
    hb = HyperBand(max_t=9)
    runner = FakeRunner(hb, _configs(9), slots=3, max_t=9, lag=2).run()
    assert runner.ended_while_paused  # eliminated at a rung they paused at
    for trial_id in runner.ended_while_paused:
        trial = runner.by_id(trial_id)
        assert trial.iteration in (1, 3)  # the rung's own result: decided in-band, no overshoot
        assert not any(d[0] == trial_id and d[1] > trial.iteration for d in runner.decisions)
    assert hb.decision_points(runner.trials[0]) == frozenset({1, 3, 9})


def test_hyperband_closes_a_bracket_the_search_cannot_fill():
    """20 trials for a 81-trial bracket: the bracket is closed with 20 and still halves."""
    runner = FakeRunner(HyperBand(max_t=81), _configs(20), slots=2, max_t=81).run()
    finished = [t for t in runner.trials if t.iteration >= 81]
    assert len(finished) == 1
    assert abs(finished[0].config["x"] - 0.3) == min(abs(t.config["x"] - 0.3) for t in runner.trials)
    assert runner.budget < 20 * 81 / 4


def test_hyperband_refuses_to_resume_a_trial_without_checkpoint():
    runner = FakeRunner(HyperBand(max_t=9), _configs(9), slots=2, max_t=9, checkpoints=False)
    with pytest.raises(RuntimeError, match="no checkpoint to resume from"):
        runner.run()


# -- PBT ----------------------------------------------------------------------------------------------
def _progress(config: dict[str, Any], t: int, state: float) -> tuple[float, float]:
    """A toy model: each step adds lr to the progress; loss is minus the progress."""
    state += config["lr"]
    return -state, state


def _population(pbt: PBT, lrs: list[float], checkpoints: bool = True) -> list[Trial]:
    pbt.set_properties("loss", "min")
    trials = [Trial(f"{i:05d}", {"lr": lr}) for i, lr in enumerate(lrs)]
    for trial in trials:
        pbt.on_trial_add(trial)
        trial.status = TrialStatus.RUNNING
        if checkpoints:
            trial.checkpoint, trial.checkpoint_iteration = f"ckpt/{trial.trial_id}", 2
    return trials


def _pause(trial: Trial) -> None:
    trial.status = TrialStatus.PAUSED


def test_pbt_exploits_a_top_trial_and_explores_its_config():
    pbt = PBT(2, {"lr": [0.1, 0.2, 0.3, 0.4]}, quantile_fraction=0.25, resample_probability=0.0, seed=0)
    trials = _population(pbt, [0.1, 0.2, 0.3, 0.4])
    # at t=2 the trials report lr * 2 of progress (loss = -progress), in the order 1, 2, 3, 0:
    # with 4 ranked, the bottom quarter is 00000 (lr .1) and the top quarter 00003 (lr .4)
    for i in (1, 2, 3):
        pbt.on_result(trials[i], {"loss": -trials[i].config["lr"] * 2, "training_iteration": 2})
    assert pbt.quantiles() == (["00001"], ["00003"])
    assert pbt.on_result(trials[0], {"loss": -0.2, "training_iteration": 2}) is Decision.PAUSE
    assert pbt.quantiles() == (["00000"], ["00003"])
    _pause(trials[0])
    suggestion = pbt.choose_next([trials[0]])
    assert suggestion is not None and suggestion.trial is trials[0] and suggestion.donor is trials[3]
    # explore moves lr to a neighbour of the donor's 0.4 (no resampling here)
    assert suggestion.config == {"lr": 0.3} or suggestion.config == {"lr": 0.4}


def test_pbt_never_exploits_a_trial_without_a_checkpoint():
    pbt = PBT(2, {"lr": [0.1, 0.4]}, seed=0)
    trials = _population(pbt, [0.1, 0.2, 0.3, 0.4], checkpoints=False)
    for i in (1, 2, 3, 0):
        pbt.on_result(trials[i], {"loss": -float(i), "training_iteration": 2})
    assert pbt.quantiles() == (["00000"], ["00003"])
    _pause(trials[0])
    suggestion = pbt.choose_next([trials[0]])
    assert suggestion is None or suggestion.donor is None  # 00003 has nothing to copy
    trials[0].status = TrialStatus.RUNNING
    trials[3].checkpoint, trials[3].checkpoint_iteration = "ckpt/00003", 4
    assert pbt.on_result(trials[0], {"loss": 0.0, "training_iteration": 4}) is Decision.PAUSE
    _pause(trials[0])
    suggestion = pbt.choose_next([trials[0]])
    assert suggestion is not None and suggestion.donor is trials[3]
    assert suggestion.config is not None and suggestion.config["lr"] in (0.1, 0.4)


def test_pbt_explore_perturbs_resamples_and_clips():
    rng = random.Random(0)
    mutations = {
        "lr": dtune.loguniform(1e-3, 1.0),
        "batch": [16, 32, 64],
        "opt": {"momentum": dtune.uniform(0.5, 0.99)},
        "layers": dtune.randint(1, 5),
    }
    config = {"lr": 0.9, "batch": 32, "opt": {"momentum": 0.9}, "layers": 4, "fixed": "keep"}
    seen = [explore(config, mutations, rng, 0.0, (1.2, 0.8)) for _ in range(50)]
    assert sorted({round(c["lr"], 9) for c in seen}) == [0.72, 1.0]  # 0.9 * 1.2 clips to 1
    assert {c["batch"] for c in seen} == {16, 64}
    assert sorted({round(c["opt"]["momentum"], 9) for c in seen}) == [0.72, 0.99]
    assert {c["layers"] for c in seen} <= {3, 4} and all(c["fixed"] == "keep" for c in seen)
    resampled = [explore(config, mutations, rng, 1.0) for _ in range(50)]
    assert len({c["lr"] for c in resampled}) == 50 and all(1e-3 <= c["lr"] <= 1 for c in resampled)
    assert config["opt"]["momentum"] == 0.9  # the donor's config is not modified
    with pytest.raises(KeyError, match="'missing'"):
        explore(config, {"missing": [1]}, rng)


@pytest.mark.parametrize("synch", [False, True])
def test_pbt_population_beats_its_start_on_the_toy_model(synch):
    """8 trials on 2 slots take turns; bad lrs are replaced by copies of good ones."""
    configs = [{"lr": lr} for lr in (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)]
    pbt = PBT(4, {"lr": dtune.loguniform(0.01, 2.0)}, synch=synch, seed=0)
    runner = FakeRunner(pbt, configs, slots=2, max_t=24, objective=_progress, lag=1).run()
    assert all(t.iteration >= 24 for t in runner.trials)  # every trial got its turn to the end
    exploited = [t for t in runner.trials if t.extra.get("lineage")]
    assert exploited and all(e["donor"] != t.trial_id for t in exploited for e in t.extra["lineage"])
    final = sorted(-t.last_result["loss"] for t in runner.trials)
    assert final[0] > 24 * 0.01 * 2  # even the worst trial was lifted well above its own lr


def test_pbt_refuses_to_resume_a_trial_without_checkpoint():
    pbt = PBT(2, {"lr": [0.1, 0.2]}, seed=0)
    configs = [{"lr": 0.1 * i} for i in range(1, 6)]
    runner = FakeRunner(pbt, configs, slots=2, max_t=8, objective=_progress, checkpoints=False)
    with pytest.raises(RuntimeError, match="PBT needs checkpoints"):
        runner.run()


def test_fake_runner_with_a_searcher_and_median_rule():
    searcher = Random(seed=0)
    searcher.set_search_properties(
        metric="loss", mode="min", param_space={"x": dtune.uniform(0, 1)}, num_samples=30, seed=None
    )
    runner = FakeRunner(MedianStopping(grace_period=3, min_samples=3), searcher, slots=2, max_t=20).run()
    assert len(runner.trials) == 30
    assert runner.budget < 30 * 20 * 0.8
    assert math.isfinite(min(t.last_result["loss"] for t in runner.trials))
