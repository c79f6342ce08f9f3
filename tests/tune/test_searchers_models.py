"""Every searcher keeps the contract; model-based ones wait for results instead of guessing."""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Callable
from typing import Any

import optuna
import pytest

import dtune
from dtune.tune.search import BOHB, ConcurrencyLimiter, Grid, Optuna, Random, Searcher

SPACE: dict[str, Any] = {
    "x": dtune.uniform(0, 1),
    "lr": dtune.loguniform(1e-4, 1e-1),
    "n": dtune.randint(1, 5),
    "q": dtune.quniform(0, 1, 0.25),
    "act": dtune.choice(["relu", "tanh"]),
    "shape": dtune.choice([[8, 8], [16]]),  # not storable by Optuna: mapped to an index
    "opt": {"momentum": dtune.uniform(0.5, 0.99)},
    "double_x": dtune.sample_from(lambda c: 2 * c["x"]),
    "const": 7,
}

SEARCHERS: dict[str, Callable[[], Searcher]] = {
    "random": lambda: Random(seed=0),
    "optuna-tpe": lambda: Optuna("tpe", seed=0, n_startup_trials=3),
    "optuna-gp": lambda: Optuna("gp", seed=0, n_startup_trials=3),
    "optuna-random": lambda: Optuna("random", seed=0),
    "optuna-instance": lambda: Optuna(optuna.samplers.TPESampler(seed=0), n_startup_trials=2),
    "bohb": lambda: BOHB(seed=0, min_points_in_model=3),
    "limited-tpe": lambda: ConcurrencyLimiter(Optuna("tpe", seed=0, n_startup_trials=3), max_concurrent=2),
}


def loss(config: dict[str, Any], t: int = 3) -> float:
    return (config["x"] - 0.3) ** 2 + (config["opt"]["momentum"] - 0.9) ** 2 + 1 / (t + 1)


def setup(searcher: Searcher, n: int, space: dict[str, Any] = SPACE, mode: str = "min") -> Searcher:
    searcher.set_search_properties(metric="loss", mode=mode, param_space=space, num_samples=n, seed=None)
    return searcher


def drive(searcher: Searcher, n: int, slots: int = 4, fail: set[int] = frozenset()) -> list[dict[str, Any]]:
    """Run ``n`` trials like the runner: fill free slots, finish the oldest trial, repeat."""
    configs: list[dict[str, Any]] = []
    running: list[tuple[str, dict[str, Any]]] = []
    while len(configs) < n or running:
        while len(running) < slots and len(configs) < n:
            trial_id = f"{len(configs):05d}"
            config = searcher.suggest(trial_id)
            if config is None:
                assert running, "suggest() returned None while nothing runs"
                break
            configs.append(config)
            running.append((trial_id, config))
        trial_id, config = running.pop(0)
        if int(trial_id) in fail:
            searcher.on_complete(trial_id, None, error=True)
            continue
        for t in (1, 2, 3):
            searcher.on_result(trial_id, {"loss": loss(config, t), "training_iteration": t})
        searcher.on_complete(trial_id, {"loss": loss(config), "training_iteration": 3})
    return configs


def in_space(config: dict[str, Any]) -> bool:
    return (
        0 <= config["x"] <= 1
        and 1e-4 <= config["lr"] <= 1e-1
        and config["n"] in (1, 2, 3, 4)
        and config["q"] in (0, 0.25, 0.5, 0.75, 1)
        and config["act"] in ("relu", "tanh")
        and config["shape"] in ([8, 8], [16])
        and 0.5 <= config["opt"]["momentum"] <= 0.99
        and config["double_x"] == 2 * config["x"]
        and config["const"] == 7
    )


# Optuna's GP sampler fits a Gaussian process per suggestion: about a second each on two cores.
NAMES = [pytest.param(n, marks=pytest.mark.slow) if n == "optuna-gp" else n for n in sorted(SEARCHERS)]


@pytest.mark.parametrize("name", NAMES)
def test_every_searcher_keeps_the_contract(name):
    """Configs in the space, errors tolerated, finished after num_samples, never stuck."""
    searcher = setup(SEARCHERS[name](), 12)
    configs = drive(searcher, 12, fail={2, 5})
    assert len(configs) == 12 and all(in_space(c) for c in configs)
    assert searcher.is_finished and searcher.suggest("99999") is None


@pytest.mark.parametrize("name", NAMES)
def test_every_searcher_state_round_trips(name):
    """A searcher restored from get_state() suggests exactly what the original would."""
    original = setup(SEARCHERS[name](), 20)
    drive(original, 8)
    state = original.get_state()
    restored = setup(SEARCHERS[name](), 20)
    restored.set_state(state)
    assert drive(restored, 12) == drive(original, 12)


@pytest.mark.parametrize("name", NAMES)
def test_every_searcher_evaluates_points_first(name):
    points = [{"x": 0.25, "act": "tanh", "opt": {"momentum": 0.95}}, {"x": 0.75, "shape": [16]}]
    factory = SEARCHERS[name]
    if name.startswith("limited"):
        searcher: Searcher = ConcurrencyLimiter(Optuna("tpe", seed=0, points_to_evaluate=points), 2)
    else:
        searcher = factory()
        kwargs: dict[str, Any] = {"points_to_evaluate": points}
        if isinstance(searcher, Optuna):
            searcher = Optuna(searcher.sampler, seed=0, **kwargs)
        else:
            searcher = type(searcher)(seed=0, **kwargs)  # type: ignore[call-arg]
    setup(searcher, 6)
    first, second = searcher.suggest("0"), searcher.suggest("1")
    assert first is not None and second is not None
    assert (first["x"], first["act"], first["opt"]["momentum"]) == (0.25, "tanh", 0.95)
    assert (second["x"], second["shape"]) == (0.75, [16])
    assert first["double_x"] == 0.5 and in_space(first) and in_space(second)


def test_points_are_checked_against_the_space():
    with pytest.raises(TypeError, match="list of config dicts"):
        Random(points_to_evaluate={"x": 1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"points_to_evaluate\[0\]\['y'\] is not a key"):
        setup(Random(points_to_evaluate=[{"y": 1}]), 2)
    with pytest.raises(ValueError, match="not one of the choice"):
        setup(Optuna(points_to_evaluate=[{"act": "gelu"}]), 2)
    grid_space = {"a": dtune.grid([1, 2]), "b": dtune.uniform(0, 1)}
    with pytest.raises(ValueError, match="must give every grid"):
        setup(Grid(points_to_evaluate=[{"b": 0.5}]), 1, space=grid_space)
    grid = setup(Grid(seed=0, points_to_evaluate=[{"a": 5, "b": 0.5}]), 1, space=grid_space)
    assert grid.total == 3 and grid.suggest("0") == {"a": 5, "b": 0.5}


# -- waiting for results --------------------------------------------------------------------------------
def test_optuna_waits_for_its_startup_trials_instead_of_guessing():
    searcher = setup(Optuna("tpe", seed=0, n_startup_trials=4), 20)
    configs = [searcher.suggest(str(i)) for i in range(16)]  # 16 free slots
    assert all(c is not None for c in configs[:4]) and configs[4:] == [None] * 12
    assert searcher.waiting
    for i in range(3):
        searcher.on_complete(str(i), {"loss": loss(configs[i])})  # type: ignore[arg-type]
    assert searcher.suggest("4") is None  # 3 of 4 finished: still waiting
    searcher.on_complete("3", None, error=True)  # a failure counts as finished too
    assert searcher.suggest("4") is not None and not searcher.waiting
    assert all(searcher.suggest(str(i)) is not None for i in range(5, 10))  # no more waiting


def test_random_sampler_never_waits():
    searcher = setup(Optuna("random", seed=0, n_startup_trials=2), 10)
    assert all(searcher.suggest(str(i)) is not None for i in range(10))


def test_bohb_waits_for_observations_then_models_the_largest_budget():
    searcher = setup(BOHB(seed=0, min_points_in_model=3, random_fraction=0.0), 30)
    first = [searcher.suggest(str(i)) for i in range(8)]
    assert all(c is not None for c in first[:3]) and first[3:] == [None] * 5
    for i in range(3):  # three trials report at budget 1, two of them also at budget 2
        searcher.on_result(str(i), {"loss": loss(first[i], 1), "training_iteration": 1})  # type: ignore[arg-type]
    assert searcher.model_budget() == 1
    for i in range(2):
        searcher.on_result(str(i), {"loss": loss(first[i], 2), "training_iteration": 2})  # type: ignore[arg-type]
    assert searcher.model_budget() == 1  # budget 2 has only two observations
    assert searcher.suggest("3") is not None and searcher.model_budgets[-1] == 1
    searcher.on_result("3", {"loss": 0.5, "training_iteration": 2})
    assert searcher.model_budget() == 2 and searcher.suggest("4") is not None
    assert searcher.model_budgets == [None, None, None, 1, 2]


def test_bohb_splits_good_and_bad_as_the_paper_does():
    searcher = setup(BOHB(seed=0), 10)  # the test space has d hyper-parameters
    d = len(searcher._space.distributions)
    assert searcher._good_points(d + 3) == d + 1  # at least d + 1 good points (Optuna: 10%, >= 1)
    assert searcher._good_points(200) == 30  # the best 15% beyond that
    assert searcher._good_points(2) == 1  # always leaves a bad one


def test_bohb_does_not_wait_when_nothing_is_out():
    searcher = setup(BOHB(seed=0, min_points_in_model=3), 10)
    for i in range(3):
        assert searcher.suggest(str(i)) is not None
    for i in range(3):
        searcher.on_complete(str(i), None, error=True)  # failed before reporting anything
    assert searcher.suggest("3") is not None


def test_limiter_caps_unfinished_trials_and_delegates():
    inner = Random(seed=0)
    limited = setup(ConcurrencyLimiter(inner, max_concurrent=2), 5)
    assert limited.suggest("0") is not None and limited.suggest("1") is not None
    assert limited.suggest("2") is None
    limited.on_complete("0", {"loss": 1.0})
    assert limited.suggest("2") is not None and limited.metric == "loss"
    with pytest.raises(ValueError, match="`max_concurrent` is 0, but must be >= 1"):
        ConcurrencyLimiter(inner, 0)
    with pytest.raises(TypeError, match="must be a dtune.search.Searcher"):
        ConcurrencyLimiter(object(), 2)  # type: ignore[arg-type]


# -- Optuna specifics -----------------------------------------------------------------------------------
def test_optuna_maps_the_space_to_distributions():
    searcher = setup(Optuna("tpe", seed=0), 4, mode="max")
    dists = searcher.study.trials[0].distributions if searcher.study.trials else None
    assert dists is None
    searcher.suggest("0")
    dists = searcher.study.trials[0].distributions
    assert set(dists) == {"x", "lr", "n", "q", "act", "shape", "opt/momentum"}
    assert dists["lr"].log and dists["n"].high == 4 and dists["q"].step == 0.25
    assert dists["shape"].choices == (0, 1) and dists["act"].choices == ("relu", "tanh")
    assert searcher.study.direction == optuna.study.StudyDirection.MAXIMIZE


def test_optuna_tells_failures_and_missing_metrics_as_failed():
    searcher = setup(Optuna("random", seed=0), 3)
    for i in range(3):
        searcher.suggest(str(i))
    searcher.on_complete("0", {"loss": 1.5})
    searcher.on_complete("1", {"other": 1.0})
    searcher.on_complete("2", {"loss": 2.0}, error=True)
    states = [t.state.name for t in searcher.study.trials]
    assert states == ["COMPLETE", "FAIL", "FAIL"] and searcher.study.trials[0].value == 1.5


def test_optuna_refuses_unknown_samplers_and_grids():
    with pytest.raises(ValueError, match="`sampler` is 'bayes', but must be one of"):
        Optuna("bayes")
    with pytest.raises(TypeError, match="`sampler` must be a name or an optuna sampler"):
        Optuna(3)
    with pytest.raises(ValueError, match="grid"):
        setup(Optuna(), 2, space={"a": dtune.grid([1, 2])})


@pytest.mark.skipif(importlib.util.find_spec("cmaes") is not None, reason="cmaes is installed")
def test_cmaes_without_its_package_says_what_to_install():
    with pytest.raises(ImportError, match="pip install cmaes"):
        Optuna("cmaes")


def test_tpe_finds_a_better_config_than_random_with_the_same_budget():
    space = {"x": dtune.uniform(0, 1), "opt": {"momentum": dtune.uniform(0.5, 0.99)}}

    def best(searcher: Searcher) -> float:
        setup(searcher, 40, space=space)
        return min(loss(c) for c in drive(searcher, 40, slots=2))

    tpe = [best(Optuna("tpe", seed=s, n_startup_trials=10)) for s in range(3)]
    rnd = [best(Random(seed=s)) for s in range(3)]
    assert sorted(tpe)[1] < sorted(rnd)[1]


def test_seeds_make_optuna_and_bohb_reproducible():
    for factory in (lambda: Optuna("tpe", seed=3, n_startup_trials=3), lambda: BOHB(seed=3)):
        a, b = setup(factory(), 15), setup(factory(), 15)
        assert drive(a, 15) == drive(b, 15)
    rng = random.Random(0)
    assert rng.random() == random.Random(0).random()  # the tests own their generators too
