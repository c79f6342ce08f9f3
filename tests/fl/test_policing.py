"""Policing: persistent liars are excluded, honest clients are not."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dtune.fl import (
    Estimates,
    ForecastConfig,
    LSTMForecaster,
    PolicingConfig,
    ProactiveGreedySelector,
    Reputation,
    Simulator,
    SimulatorConfig,
    TaskConfig,
    TraceConfig,
    binomial_tail,
    generate_traces,
    make_task,
)


def test_binomial_tail_matches_the_exact_sum():
    for k, n, p in [(0, 5, 0.3), (3, 10, 0.25), (10, 10, 0.5), (11, 10, 0.5), (4, 30, 0.01)]:
        exact = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))
        assert binomial_tail(k, n, p) == pytest.approx(exact, rel=1e-9, abs=1e-300)


def promise(n):
    return Estimates(train_s=np.full(n, 5.0), report_s=np.full(n, 5.0), p_available=np.ones(n))


def test_reputation_excludes_a_persistent_liar_and_spares_honest_clients():
    police = Reputation(PolicingConfig())
    rng = np.random.default_rng(0)
    clients = np.arange(11)  # 0..9 honest (break 10% of promises), 10 lies every time
    for _ in range(60):
        broken = np.append(rng.random(10) < 0.1, True)
        police.record(clients, ~broken, np.where(broken, np.inf, 9.0), 30.0, promised=promise(11))
    assert police.is_excluded(clients).tolist() == [False] * 10 + [True]
    assert police.excluded_at[10] == 5  # 5 of 5 broken: P = 0.25^5 < 1e-3


def test_a_single_violation_is_not_enough():
    police = Reputation(PolicingConfig(min_observations=1))
    police.record(np.array([3]), np.array([False]), np.array([np.inf]), 30.0, promised=promise(1))
    assert not police.is_excluded(np.array([3]))[0]


def test_outlying_updates_count_as_violations():
    police = Reputation()
    updates = np.vstack([np.random.default_rng(0).normal(0, 1, (6, 20)), np.full((1, 20), 30.0)])
    assert police.outliers(updates).tolist() == [False] * 6 + [True]
    for _ in range(5):
        police.record(np.arange(7), np.ones(7, bool), np.full(7, 9.0), 30.0, updates=updates)
    assert police.is_excluded(np.arange(7)).tolist() == [False] * 6 + [True]


def test_policing_excludes_liars_without_excluding_honest_clients_in_a_seeded_run():
    traces = generate_traces(TraceConfig(num_clients=40, duration_s=14400.0, history_s=7200.0), seed=0)
    forecaster = LSTMForecaster(ForecastConfig(window=16, batch=16, steps=100, horizon=4), seed=0).fit(traces)
    sim = Simulator(
        traces=traces,
        task=make_task(TaskConfig(num_clients=40), seed=0),
        selector=ProactiveGreedySelector(seed=0),
        config=SimulatorConfig(num_select=8, deadline_s=30.0, liar_fraction=0.1),
        forecaster=forecaster,
        police=Reputation(),
        seed=0,
    )
    sim.run(150)
    excluded = sim.police.is_excluded(np.arange(40))
    assert excluded[sim.liars].any()  # liars who cannot keep their promises are found out...
    assert not excluded[~sim.liars].any()  # ...and no honest client is excluded
    late = sum(r.liars_selected for r in sim.history[-50:])
    early = sum(r.liars_selected for r in sim.history[:50])
    assert late < early
