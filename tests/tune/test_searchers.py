from __future__ import annotations

import pytest

import dtune
from dtune.tune.search import Grid, Random


def _setup(searcher, space, n, seed=None):
    searcher.set_search_properties(metric="m", mode="max", param_space=space, num_samples=n, seed=seed)
    return searcher


def test_random_is_seeded_and_stops_at_num_samples():
    space = {"x": dtune.uniform(0, 1)}
    a = _setup(Random(seed=3), space, 5)
    b = _setup(Random(), space, 5, seed=3)  # the run's seed reaches a searcher without its own
    configs_a = [a.suggest(str(i)) for i in range(5)]
    assert configs_a == [b.suggest(str(i)) for i in range(5)]
    assert a.is_finished and a.suggest("5") is None
    assert len({c["x"] for c in configs_a}) == 5


def test_grid_is_cartesian_product_times_num_samples():
    space = {"a": dtune.grid([1, 2]), "b": {"c": dtune.grid(["x", "y", "z"])}, "r": dtune.uniform(0, 1)}
    searcher = _setup(Grid(seed=0), space, 2)
    assert searcher.total == 12
    configs = [searcher.suggest(str(i)) for i in range(12)]
    assert searcher.is_finished and searcher.suggest("12") is None
    points = sorted((c["a"], c["b"]["c"]) for c in configs)
    assert points == sorted([(a, c) for a in (1, 2) for c in "xyz"] * 2)
    assert all(0 <= c["r"] < 1 for c in configs)


def test_state_round_trip_continues_the_same_sequence():
    space = {"x": dtune.uniform(0, 1), "f": dtune.sample_from(lambda c: c["x"] + 1)}
    original = _setup(Random(seed=1), space, 10)
    [original.suggest(str(i)) for i in range(4)]
    state = original.get_state()
    expected = [original.suggest(str(i)) for i in range(4, 10)]
    restored = _setup(Random(seed=99), space, 10)
    restored.set_state(state)
    assert [restored.suggest(str(i)) for i in range(4, 10)] == expected
    assert restored.is_finished


def test_random_refuses_to_sample_a_grid():
    searcher = _setup(Random(seed=0), {"g": dtune.grid([1, 2])}, 1)
    with pytest.raises(ValueError, match="grid"):
        searcher.suggest("0")
