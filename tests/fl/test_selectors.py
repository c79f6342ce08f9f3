"""The selection contract: every selector passes one API test; each one's rule on hand-made contexts."""

from __future__ import annotations

import numpy as np
import pytest

from dtune.fl import (
    ForecastConfig,
    LSTMForecaster,
    OortConfig,
    OortSelector,
    ProactiveGreedySelector,
    ProactiveSelector,
    RandomSelector,
    ReactiveSelector,
    RoundFeedback,
    Selector,
    SelectorKind,
    Simulator,
    SimulatorConfig,
    TaskConfig,
    TraceConfig,
    generate_traces,
    greedy_fit,
    make_selector,
    make_task,
)
from tests.fl._helpers import context


@pytest.fixture(scope="module")
def world():
    traces = generate_traces(TraceConfig(num_clients=30, duration_s=6000.0, history_s=1500.0), seed=0)
    task = make_task(TaskConfig(num_clients=30), seed=0)
    forecaster = LSTMForecaster(ForecastConfig(window=8, horizon=4, steps=10), seed=0).fit(traces)
    return traces, task, forecaster


def simulate(world, selector, rounds=12, **config):
    traces, task, forecaster = world
    sim = Simulator(
        traces=traces,
        task=task,
        selector=selector,
        forecaster=forecaster,
        config=SimulatorConfig(num_select=5, **config),
        seed=0,
    )
    sim.run(rounds)
    return sim


@pytest.mark.parametrize("kind", list(SelectorKind))
def test_every_selector_honours_the_contract(world, kind):
    sim = simulate(world, make_selector(kind, seed=1))
    for result in sim.history:
        assert len(result.selected) == min(5, result.num_candidates)
        assert len(set(result.selected.tolist())) == len(result.selected)
        assert np.all(world[0].available[result.selected, world[0].slot(result.start_s) % world[0].num_slots])
    again = simulate(world, make_selector(kind, seed=1))  # same seed, same selections
    assert [r.selected.tolist() for r in again.history] == [r.selected.tolist() for r in sim.history]


class Cheater(Selector):
    def __init__(self, picks):
        self.picks = picks

    def select(self, context):
        return np.asarray(self.picks(context))


@pytest.mark.parametrize(
    "picks",
    [lambda c: [c.candidates[0]] * 2, lambda c: c.candidates[:6], lambda c: [10_000]],
    ids=["duplicates", "too many", "not a candidate"],
)
def test_simulator_rejects_selections_outside_the_contract(world, picks):
    with pytest.raises(ValueError, match="must return at most 5 distinct ids from context.candidates"):
        simulate(world, Cheater(picks), rounds=1)


def test_greedy_fit_takes_the_fastest_that_fit_then_fills():
    ctx = context([10, 50, 5, 25, np.inf, 12], k=3)
    assert sorted(greedy_fit(ctx.observed, 30.0, 3).tolist()) == [0, 2, 5]
    # only four fit; the fifth place goes to the fastest of the rest (50 s), not to the one that never ends
    assert sorted(greedy_fit(ctx.observed, 30.0, 5).tolist()) == [0, 1, 2, 3, 5]


def test_reactive_plans_with_what_it_sees_and_proactive_with_what_clients_forecast():
    # client 0 looks fastest now but forecasts that it will go offline; client 3 forecasts a slowdown
    ctx = context([5, 10, 12, 8, 20], k=3, forecasts=[5, 10, 12, 40, 20], p_available=[0.1, 1, 1, 1, 1])
    assert ReactiveSelector(seed=0).select(ctx).tolist() == [0, 1, 3]
    assert ProactiveGreedySelector(seed=0).select(ctx).tolist() == [1, 2, 4]


def test_fedcs_resource_request_asks_a_random_pool():
    ctx = context(np.arange(1.0, 41.0), k=2)
    picks = {tuple(ReactiveSelector(seed=s, pool_factor=2.0).select(ctx).tolist()) for s in range(10)}
    assert len(picks) > 1  # different pools, different picks
    assert all(len(p) == 2 for p in picks)


def _feedback(round, selected, durations, utility, valid=None):
    selected = np.asarray(selected)
    return RoundFeedback(
        round=round,
        deadline_s=30.0,
        selected=selected,
        valid=np.ones(len(selected), bool) if valid is None else np.asarray(valid),
        dropped=np.zeros(len(selected), bool),
        duration_s=np.asarray(durations, float),
        utility=np.asarray(utility, float),
        accuracy_gain=0.0,
        latency_s=30.0,
    )


def test_oort_exploits_high_utility_and_penalises_slow_clients():
    oort = OortSelector(seed=0, config=OortConfig(exploration_factor=0.0, exploration_min=0.0))
    ctx = context(np.full(20, 5.0), k=4)
    oort.select(ctx)
    # everyone has taken part once: 0-3 useful and fast, 4-7 useful but 20x slower, the rest useless
    durations = np.where((np.arange(20) >= 4) & (np.arange(20) < 8), 100.0, 5.0)
    utility = np.where(np.arange(20) < 8, 100.0, 1.0)
    oort.feedback(_feedback(0, np.arange(20), durations, utility))
    assert oort.select(ctx).tolist() == [0, 1, 2, 3]
    # without the duration penalty the slow ones compete again
    lax = OortSelector(
        seed=0, config=OortConfig(exploration_factor=0.0, exploration_min=0.0, round_threshold=100)
    )
    lax.select(ctx)
    lax.feedback(_feedback(0, np.arange(20), durations, utility))
    assert set(np.concatenate([lax.select(ctx) for _ in range(10)]).tolist()) & {4, 5, 6, 7}


def test_oort_explores_a_decaying_fraction_of_unseen_clients():
    oort = OortSelector(seed=0)  # exploration starts at 0.9, x0.98 per round, floor 0.3
    ctx = context(np.full(100, 5.0), k=10)
    first = oort.select(ctx)
    oort.feedback(_feedback(0, first, np.full(10, 5.0), np.full(10, 50.0)))
    assert oort.exploration == pytest.approx(0.9 * 0.98)
    for r in range(1, 200):
        oort.feedback(_feedback(r, oort.select(ctx), np.full(10, 5.0), np.full(10, 50.0)))
    assert oort.exploration == pytest.approx(0.3)


def test_oort_pacer_relaxes_the_preferred_duration_when_utility_flattens():
    oort = OortSelector(seed=0, config=OortConfig(pacer_step=5, exploration_min=0.0))
    ctx = context(np.arange(1.0, 31.0), k=5)
    for r in range(30):
        picked = oort.select(ctx)
        oort.feedback(_feedback(r, picked, np.full(5, 5.0), np.full(5, 7.0)))
    assert oort.round_threshold > 30.0


def test_selectors_validate_their_options():
    with pytest.raises(ValueError, match=r"The value of `pool_factor` is 0.5, but must be >= 1"):
        ReactiveSelector(seed=0, pool_factor=0.5)
    with pytest.raises(ValueError, match=r"The value of `latency_weight` is -1"):
        ProactiveSelector(seed=0, latency_weight=-1.0)
    with pytest.raises(ValueError, match=r"The value of `round_threshold` is 0"):
        OortConfig(round_threshold=0)
    with pytest.raises(ValueError, match="one of 'random', 'reactive', 'oort'"):
        make_selector("fastest", seed=0)
    with pytest.raises(RuntimeError, match="pass forecaster=LSTMForecaster"):
        ctx = context([1.0, 2.0])
        object.__setattr__(ctx, "forecaster", None)
        ProactiveGreedySelector(seed=0).select(ctx)
    assert isinstance(make_selector("random", seed=0), RandomSelector)
