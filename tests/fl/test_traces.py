"""Traces and the timing model: exact phase times, validity and dropouts on hand-made traces."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from dtune.fl import (
    ModelConfig,
    Selector,
    Simulator,
    SimulatorConfig,
    TaskConfig,
    TraceConfig,
    TraceKind,
    TraceSet,
    from_fedscale,
    generate_traces,
    load_fedscale,
    make_task,
    to_fedscale,
)
from dtune.fl._traces import time_to_finish


def hand_made() -> TraceSet:
    """Five clients, 10-second slots. With work 100 samples and a 40 Mbit upload from t=5:

    0: speed 10 -> trains 5..15; 8 Mbit/s -> reports 15..20: total 15 s, valid.
    1: speed 5 then 20 -> 25 samples by t=10, 75 more by 13.75; 4 Mbit/s until 20 (25 Mbit),
       then 1 Mbit/s for the other 15 Mbit -> done at 35: total 30 s exactly.
    2: like 0 but offline during slot 1 -> leaves at t=10 (5 s in): a dropout.
    3: like 0 but offline from slot 2 (t=20), exactly when it has finished: valid.
    4: speed 1 -> 100 s of training, never done within the 60 s horizon: a straggler.
    """
    speed = np.array(
        [[10, 10, 10, 10, 10, 10, 10, 10], [5, 20, 20, 20, 20, 20, 20, 20], [10] * 8, [10] * 8, [1] * 8],
        dtype=float,
    )
    bandwidth = np.array([[8] * 8, [4, 4, 1, 1, 1, 1, 1, 1], [8] * 8, [8] * 8, [8] * 8], dtype=float)
    available = np.ones((5, 8), bool)
    available[2, 1] = False
    available[3, 2:] = False
    return TraceSet(step_s=10.0, speed=speed, bandwidth=bandwidth, available=available)


def test_phase_times_are_exact_on_a_hand_made_trace():
    phases = hand_made().phase_times(np.arange(5), start_s=5.0, work=100.0, upload_mbit=40.0, limit_s=60.0)
    np.testing.assert_allclose(phases.train_s[:4], [10.0, 8.75, 10.0, 10.0])
    np.testing.assert_allclose(phases.report_s[:4], [5.0, 21.25, 5.0, 5.0])
    assert np.isinf(phases.train_s[4]) and np.isinf(phases.report_s[4])
    np.testing.assert_allclose(phases.online_s, [60.0, 60.0, 5.0, 15.0, 60.0])
    assert phases.valid(30.0).tolist() == [True, True, False, True, False]
    assert phases.valid(29.9).tolist() == [True, False, False, True, False]
    assert phases.valid(14.9).tolist() == [False] * 5
    assert phases.dropped(30.0).tolist() == [False, False, True, False, False]


class Fixed(Selector):
    """Test double: selects the given clients (those that are candidates)."""

    def __init__(self, clients):
        self.clients = np.asarray(clients)

    def select(self, context):
        return self.clients[np.isin(self.clients, context.candidates)]


def test_simulator_decides_a_round_exactly_from_a_hand_made_trace():
    traces = hand_made()
    traces = TraceSet(
        step_s=10.0, speed=traces.speed, bandwidth=traces.bandwidth, available=traces.available, start_s=5.0
    )
    sim = Simulator(
        traces=traces,
        task=make_task(TaskConfig(num_clients=5, min_samples=5), seed=0),
        selector=Fixed([0, 1, 2, 3, 4]),
        model=ModelConfig(local_steps=10, batch_size=10),
        config=SimulatorConfig(num_select=5, deadline_s=30.0, model_size_mb=5.0),
        seed=0,
    )
    first = sim.step()
    assert first.valid.tolist() == [True, True, False, True, False]
    assert first.dropped.tolist() == [False, False, True, False, False]
    assert first.latency_s == 30.0 and first.aggregated  # not all reported: the server waits the deadline
    np.testing.assert_allclose(first.duration_s[:4], [15.0, 30.0, 15.0, 15.0])
    sim2 = Simulator(
        traces=traces,
        task=make_task(TaskConfig(num_clients=5, min_samples=5), seed=0),
        selector=Fixed([0, 3]),
        model=ModelConfig(local_steps=10, batch_size=10),
        config=SimulatorConfig(num_select=5, deadline_s=30.0, model_size_mb=5.0),
        seed=0,
    )
    assert sim2.step().latency_s == 15.0  # everyone reported: the round ends with the last report
    assert sim2.clock_s == 20.0


def test_time_to_finish_integrates_piecewise_rates_from_an_offset():
    rates = np.array([[2.0, 0.0, 4.0], [1.0, 1.0, 1.0]])
    elapsed = time_to_finish(rates, np.array([5.0, 0.0]), np.array([18.0, 40.0]), 10.0)
    # 5 s at 2 = 10, a dead slot, then 8 more at 4 -> 2 s into the third slot: 5 + 10 + 2
    assert elapsed[0] == pytest.approx(17.0)
    assert np.isinf(elapsed[1])  # only 30 units fit in the window


def test_traces_wrap_around():
    traces = TraceSet(
        step_s=10.0,
        speed=np.array([[1.0, 100.0]]),
        bandwidth=np.full((1, 2), 80.0),
        available=np.ones((1, 2), bool),
    )
    # starting in slot 3 = slot 1 of the second lap: fast
    assert traces.phase_times(np.array([0]), 35.0, 100.0, 8.0, 60.0).train_s[0] == pytest.approx(1.0)
    assert traces.at(25.0)[0].tolist() == [1.0]


def test_trace_set_validates_its_arrays():
    ones = np.ones((2, 3))
    with pytest.raises(ValueError, match="`bandwidth` has shape"):
        TraceSet(step_s=1.0, speed=ones, bandwidth=np.ones((2, 4)), available=ones > 0)
    with pytest.raises(ValueError, match="`speed` must be finite and >= 0"):
        TraceSet(step_s=1.0, speed=-ones, bandwidth=ones, available=ones > 0)
    with pytest.raises(ValueError, match="The value of `start_s` is 3.0, but must be in"):
        TraceSet(step_s=1.0, speed=ones, bandwidth=ones, available=ones > 0, start_s=3.0)


def test_generator_is_deterministic_under_a_seed():
    config = TraceConfig(num_clients=15, duration_s=3000.0, history_s=1000.0)
    a, b, c = (
        generate_traces(config, seed=3),
        generate_traces(config, seed=3),
        generate_traces(config, seed=4),
    )
    for name in ("speed", "bandwidth", "available"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.speed, c.speed)
    assert a.speed.shape == (15, 300) and a.start_s == 1000.0


def _lag1(x):
    x = x - x.mean(axis=1, keepdims=True)
    return float((x[:, 1:] * x[:, :-1]).sum() / (x**2).sum())


def test_predictable_traces_have_dynamics_and_the_iid_control_has_none():
    config = TraceConfig(num_clients=40, duration_s=7200.0, history_s=1000.0)
    predictable = generate_traces(config, seed=0)
    control = generate_traces(
        TraceConfig(num_clients=40, duration_s=7200.0, history_s=1000.0, kind=TraceKind.IID), 0
    )
    for name in ("speed", "bandwidth"):
        assert _lag1(np.log(getattr(predictable, name))) > 0.5
        assert abs(_lag1(np.log(getattr(control, name)))) < 0.05
    assert _lag1(predictable.available.astype(float)) > 0.9
    assert abs(_lag1(control.available.astype(float))) < 0.05
    # the control has no client-level heterogeneity either: all clients share one distribution
    assert np.std(np.log(control.speed).mean(axis=1)) < 0.1 < np.std(np.log(predictable.speed).mean(axis=1))


def test_trace_config_rejects_bad_values_with_the_template():
    with pytest.raises(ValueError, match=r"The value of `num_clients` is 0, but must be an integer >= 1\."):
        TraceConfig(num_clients=0)
    with pytest.raises(ValueError, match="`cell_probabilities`"):
        TraceConfig(cell_probabilities=(0.5, 0.5, 0.5))
    with pytest.raises(TypeError, match="dtune.fl.TraceKind"):
        TraceConfig(kind="iid")  # type: ignore[arg-type]


def test_fedscale_dicts_convert_with_fedscale_units():
    capacity = {
        7: {"computation": 50.0, "communication": 2000.0},
        9: {"computation": 10.0, "communication": 500.0},
    }
    behaviour = {
        7: {"active": [0.0, 40.0], "inactive": [20.0, 60.0], "finish_time": 60.0},
        9: {"active": [15.0], "inactive": [60.0], "finish_time": 60.0},
    }
    traces, ids = from_fedscale(capacity, behaviour, step_s=10.0, duration_s=120.0)
    assert ids == [7, 9]
    # FedScale: 3 * computation ms per training sample; kbit/s
    np.testing.assert_allclose(traces.speed[:, 0], [1000 / 150, 1000 / 30])
    np.testing.assert_allclose(traces.bandwidth[:, 0], [2.0, 0.5])
    assert traces.available[0].tolist() == [True, True, False, False, True, True] * 2
    assert traces.available[1].tolist() == [False, False, True, True, True, True] * 2  # slot 10-20 not whole


def test_fedscale_round_trip_keeps_availability_and_mean_capacity(tmp_path):
    traces = generate_traces(TraceConfig(num_clients=6, duration_s=2000.0, history_s=500.0), seed=1)
    capacity, behaviour = to_fedscale(traces)
    (tmp_path / "capacity").write_bytes(pickle.dumps(capacity))
    (tmp_path / "behaviour").write_bytes(pickle.dumps(behaviour))
    back, ids = load_fedscale(tmp_path / "capacity", tmp_path / "behaviour", step_s=traces.step_s)
    assert ids == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(back.available, traces.available)
    np.testing.assert_allclose(back.speed.mean(axis=1), traces.speed.mean(axis=1))
    np.testing.assert_allclose(back.bandwidth[:, 0], traces.bandwidth.mean(axis=1))


def test_fedscale_conversion_rejects_incomplete_input():
    with pytest.raises(ValueError, match="no device capacity or behaviour trace"):
        from_fedscale({1: {"computation": 1.0, "communication": 1.0}}, {}, clients=[1], duration_s=10.0)
    with pytest.raises(ValueError, match="give `duration_s`"):
        from_fedscale({1: {"computation": 1.0, "communication": 1.0}})
