"""Aggregators against hand-computed results, and their refusals outside their guarantees."""

from __future__ import annotations

import numpy as np
import pytest

from dtune.fl import (
    Bulyan,
    FedAvg,
    Krum,
    Median,
    MultiKrum,
    RandomSelector,
    Simulator,
    SimulatorConfig,
    TaskConfig,
    TraceConfig,
    TrimmedMean,
    generate_traces,
    krum_scores,
    make_aggregator,
    make_task,
)

# five 2-d updates: four close together, one far away
UPDATES = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [10.0, 10.0]])


def test_fedavg_is_the_example_weighted_mean():
    out = FedAvg().aggregate(UPDATES[:3], weights=np.array([2.0, 1.0, 1.0]))
    np.testing.assert_allclose(out, [(0 + 1 + 0) / 4, (0 + 0 + 1) / 4])
    np.testing.assert_allclose(FedAvg().aggregate(UPDATES), [2.4, 2.4])  # no weights: plain mean


def test_median_per_coordinate():
    np.testing.assert_allclose(Median().aggregate(UPDATES), [1.0, 1.0])
    np.testing.assert_allclose(Median().aggregate(UPDATES[:4]), [0.5, 0.5])  # even n: mean of the middle two


def test_trimmed_mean_drops_floor_beta_n_from_each_end():
    # beta=0.2, n=5: drop one from each end per coordinate -> mean of the middle three
    np.testing.assert_allclose(TrimmedMean(beta=0.2).aggregate(UPDATES), [2 / 3, 2 / 3])
    # beta=0.1, n=5: floor(0.5) = 0 -> the plain mean
    np.testing.assert_allclose(TrimmedMean(beta=0.1).aggregate(UPDATES), [2.4, 2.4])


def test_krum_scores_sum_the_nearest_squared_distances():
    # f=1, n=5: each update scores its n - f - 2 = 2 nearest others
    # [0,0]: 1 + 1; [1,0]: 1 + 1; [0,1]: 1 + 1; [1,1]: 1 + 1; [10,10]: 162 + 181
    np.testing.assert_allclose(krum_scores(UPDATES, f=1), [2, 2, 2, 2, 343])
    np.testing.assert_allclose(Krum(f=1).aggregate(UPDATES), [0.0, 0.0])  # first of the tied best


def test_multi_krum_averages_the_m_best():
    updates = np.array([[0.0], [0.1], [0.25], [0.3], [0.4], [0.6], [9.0]])
    # scores (f=1, 4 nearest): 0.3225, 0.1625, 0.11, 0.1425, 0.1625, 0.5025, 296.77
    np.testing.assert_allclose(
        krum_scores(updates, 1), [0.3225, 0.1625, 0.11, 0.1425, 0.1625, 0.5025, 296.7725]
    )
    np.testing.assert_allclose(MultiKrum(f=1, m=2).aggregate(updates), [(0.25 + 0.3) / 2])


def test_bulyan_selects_by_repeated_krum_then_averages_around_the_median():
    updates = np.array([[0.0], [0.1], [0.2], [0.3], [0.4], [0.5], [9.0]])
    bulyan = Bulyan(f=1)
    # theta = n - 2f = 5 picks by Krum on the shrinking set; then beta = theta - 2f = 3 values
    # closest to the median of the picks (0.2) are averaged: 0.1, 0.2, 0.3
    picked = set(updates[bulyan.selection(updates), 0].round(6).tolist())
    assert picked == {0.0, 0.1, 0.2, 0.3, 0.4}
    np.testing.assert_allclose(bulyan.aggregate(updates), [0.2])


def test_robust_aggregators_ignore_two_huge_outliers_of_ten():
    rng = np.random.default_rng(0)
    honest = rng.normal(1.0, 0.1, size=(8, 50))
    updates = np.vstack([honest, np.full((2, 50), 1e3)])
    assert np.abs(FedAvg().aggregate(updates) - 1.0).max() > 100
    for aggregator in (Median(f=2), TrimmedMean(beta=0.2, f=2), Krum(f=2), MultiKrum(f=2, m=4), Bulyan(f=1)):
        assert np.abs(aggregator.aggregate(updates) - 1.0).max() < 0.3, aggregator


@pytest.mark.parametrize(
    ("aggregator", "n", "message"),
    [
        (Krum(f=4), 10, r"The value of `f` is 4, but must be <= \(n - 3\)/2 = 3.5 for Krum \(n=10\)\."),
        (MultiKrum(f=1, m=9), 9, r"The value of `m` is 9, but must be <= n - f = 8 for MultiKrum \(n=9\)\."),
        (Bulyan(f=2), 10, r"The value of `f` is 2, but must be <= \(n - 3\)/4 = 1.75 for Bulyan \(n=10\)\."),
        (Median(f=5), 10, r"The value of `f` is 5, but must be < n/2 = 5 for Median \(n=10\)\."),
        (
            TrimmedMean(beta=0.1, f=2),
            10,
            r"must be <= floor\(beta \* n\) = 1 for TrimmedMean \(n=10, beta=0.1\)",
        ),
    ],
)
def test_aggregators_refuse_round_sizes_outside_their_guarantee(aggregator, n, message):
    with pytest.raises(ValueError, match=message):
        aggregator.check(n)
    with pytest.raises(ValueError, match=message):
        aggregator.aggregate(np.zeros((n, 3)))


def test_aggregators_validate_their_configuration():
    with pytest.raises(ValueError, match=r"The value of `f` is -1, but must be an integer >= 0\."):
        Krum(f=-1)
    with pytest.raises(ValueError, match=r"The value of `beta` is 0.5, but must be in \[0, 0.5\)\."):
        TrimmedMean(beta=0.5)
    with pytest.raises(ValueError, match=r"The value of `m` is 0"):
        MultiKrum(f=1, m=0)
    with pytest.raises(ValueError, match="`weights` must be 2 finite values >= 0"):
        FedAvg().aggregate(np.zeros((2, 3)), weights=np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="one of 'fedavg'"):
        make_aggregator("mean")


def test_simulator_refuses_a_round_size_outside_the_aggregator_guarantee():
    traces = generate_traces(TraceConfig(num_clients=20, duration_s=2000.0, history_s=500.0), seed=0)
    with pytest.raises(ValueError, match=r"for Krum \(n=10\)"):
        Simulator(
            traces=traces,
            task=make_task(TaskConfig(num_clients=20), seed=0),
            selector=RandomSelector(seed=0),
            aggregator=Krum(f=4),
            config=SimulatorConfig(num_select=10),
            seed=0,
        )


@pytest.mark.parametrize(
    "aggregator",
    [FedAvg(), Median(f=1), TrimmedMean(beta=0.2, f=1), Krum(f=1), MultiKrum(f=1, m=3), Bulyan(f=1)],
    ids=repr,
)
def test_every_aggregator_honours_the_contract(aggregator):
    rng = np.random.default_rng(0)
    n = max(aggregator.min_clients(), 7)
    updates, weights = rng.normal(size=(n, 4)), rng.integers(1, 20, n).astype(float)
    out = aggregator.aggregate(updates, weights)
    assert out.shape == (4,) and np.all(np.isfinite(out))
    order = rng.permutation(n)
    np.testing.assert_allclose(aggregator.aggregate(updates[order], weights[order]), out)  # no favourite slot
    np.testing.assert_allclose(aggregator.aggregate(np.tile(out, (n, 1)), weights), out)  # agreement is kept
    aggregator.check(aggregator.min_clients())
    if aggregator.min_clients() > 1:
        with pytest.raises(ValueError):
            aggregator.check(aggregator.min_clients() - 1)
