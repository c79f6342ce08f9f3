"""The simulator: seeded determinism, the round API, scale, attacks, liars and dtune.run."""

from __future__ import annotations

import numpy as np
import pytest

import dtune
from dtune.fl import (
    Attack,
    AttackKind,
    ForecastConfig,
    LSTMForecaster,
    Median,
    ModelConfig,
    ProactiveGreedySelector,
    RandomSelector,
    Simulator,
    SimulatorConfig,
    TaskConfig,
    TaskKind,
    TraceConfig,
    build_simulation,
    generate_traces,
    make_task,
    summarize,
)
from dtune.tune.trial import TrialStatus
from tests.fl import _trainables


def small(seed=0, *, selector=None, clients=30, attack=None, aggregator=None, **config):
    traces = generate_traces(TraceConfig(num_clients=clients, duration_s=7200.0, history_s=1800.0), seed=seed)
    return Simulator(
        traces=traces,
        task=make_task(TaskConfig(num_clients=clients), seed=seed),
        selector=selector or RandomSelector(seed=seed),
        config=SimulatorConfig(num_select=5, **config),
        model=ModelConfig(hidden=8),
        attack=attack,
        aggregator=aggregator,
        seed=seed,
    )


def fingerprint(sim):
    return [(r.selected.tolist(), r.valid.tolist(), r.latency_s, r.accuracy) for r in sim.history]


def test_simulation_is_deterministic_under_a_seed():
    a, b, c = small(0), small(0), small(1)
    for sim in (a, b, c):
        sim.run(15)
    assert fingerprint(a) == fingerprint(b)
    np.testing.assert_array_equal(a.theta, b.theta)
    assert fingerprint(a) != fingerprint(c)


def test_round_api_step_run_and_stopping_rules():
    stepped, ran = small(), small()
    for _ in range(5):
        stepped.step()
    ran.run(5)
    assert fingerprint(stepped) == fingerprint(ran)
    assert ran.clock_s == pytest.approx(ran.traces.start_s + sum(r.latency_s for r in ran.history))
    timed = small()
    timed.run(until_s=100.0)
    assert timed.clock_s - timed.traces.start_s >= 100.0 > timed.history[-2].end_s - timed.traces.start_s
    targeted = small()
    played = targeted.run(200, target_accuracy=0.5)
    assert targeted.accuracy >= 0.5 and len(played) < 200 and played[-2].accuracy < 0.5
    with pytest.raises(ValueError, match="or the run would never end"):
        small().run()


def test_training_improves_the_global_model():
    sim = small()
    start = sim.accuracy
    sim.run(40)
    summary = summarize(sim.history, target_accuracy=0.8)
    assert summary.final_accuracy > start + 0.4
    assert 0 < summary.valid_ratio <= 1 and summary.dropout_rate + summary.straggler_rate == pytest.approx(
        1 - summary.valid_ratio
    )


def test_thousands_of_clients_simulate_without_a_process_each():
    clients = 2000
    traces = generate_traces(TraceConfig(num_clients=clients, duration_s=3600.0, history_s=600.0), seed=0)
    task = make_task(TaskConfig(kind=TaskKind.SYNTHETIC, num_clients=clients), seed=0)
    sim = Simulator(
        traces=traces,
        task=task,
        selector=RandomSelector(seed=0),
        config=SimulatorConfig(num_select=100),
        seed=0,
    )
    sim.run(5)
    assert all(r.num_candidates > 500 for r in sim.history)
    assert all(len(r.selected) == 100 for r in sim.history) and sim.history[-1].num_valid > 0


def test_a_robust_aggregator_survives_an_attack_that_breaks_fedavg():
    attack = Attack(kind=AttackKind.SIGN_FLIP, per_round=1)
    fedavg = small(attack=attack, deadline_s=200.0)
    median = small(attack=attack, aggregator=Median(f=1), deadline_s=200.0)
    for sim in (fedavg, median):
        sim.run(40)
    assert sum(r.num_attackers for r in fedavg.history) >= 30
    assert median.accuracy > fedavg.accuracy + 0.2


def test_strategic_liars_inflate_what_the_selector_sees():
    traces = generate_traces(TraceConfig(num_clients=20, duration_s=7200.0, history_s=1800.0), seed=0)
    forecaster = LSTMForecaster(ForecastConfig(window=8, horizon=4, steps=5), seed=0).fit(traces)
    sim = Simulator(
        traces=traces,
        task=make_task(TaskConfig(num_clients=20), seed=0),
        selector=ProactiveGreedySelector(seed=0),
        forecaster=forecaster,
        config=SimulatorConfig(num_select=5, liar_fraction=0.25, liar_factor=0.2),
        seed=0,
    )
    assert sim.liars.sum() == 5
    liars = np.flatnonzero(sim.liars)
    sent = sim._forecasts(liars)
    assert np.all(sent.total_s <= 0.2 * 30.0) and np.all(sent.p_available == 1.0)


def test_simulator_checks_that_traces_and_task_match():
    traces = generate_traces(TraceConfig(num_clients=10, duration_s=2000.0, history_s=500.0), seed=0)
    with pytest.raises(ValueError, match="The traces have 10 clients but the task has 12"):
        Simulator(
            traces=traces,
            task=make_task(TaskConfig(num_clients=12), seed=0),
            selector=RandomSelector(seed=0),
            seed=0,
        )
    with pytest.raises(ValueError, match="The value of `trace_kind` is 'weekly', but must be one of"):
        build_simulation({"trace_kind": "weekly"})


def test_dtune_run_tunes_a_federation(tmp_path):
    results = dtune.run(
        _trainables.small_federation,
        param_space={"deadline_s": dtune.grid([15.0, 60.0]), "rounds": 4, "selector": "reactive"},
        metric="accuracy",
        mode="max",
        storage=tmp_path / "exp",
        verbose=0,
        seed=0,
    )
    assert len(results) == 2 and all(t.status is TrialStatus.TERMINATED for t in results)
    for trial in results:
        history = trial.metrics_history
        assert [r["training_iteration"] for r in history] == [1, 2, 3, 4]
        assert {"accuracy", "valid_ratio", "latency_s", "virtual_time_s"} <= set(history[-1])
        assert all(r["latency_s"] <= trial.config["deadline_s"] for r in history)
    by_deadline = {t.config["deadline_s"]: t.metrics for t in results}
    assert by_deadline[60.0]["valid_ratio"] >= by_deadline[15.0]["valid_ratio"]
