"""Optuna's samplers (TPE, CMA-ES, GP, random) behind dtune's :class:`Searcher` contract.

TPE: Bergstra, Bardenet, Bengio, Kégl, "Algorithms for Hyper-Parameter Optimization", NeurIPS
2011; Optuna: Akiba, Sano, Yanase, Ohta, Koyama, KDD 2019 (arXiv:1907.10902).

The adapter maps dtune's space to Optuna distributions once, then runs Optuna's ask/tell
interface: ``suggest`` asks, ``on_complete`` tells the trial's last reported value (FAIL for an
error or a missing/non-finite metric). Intermediate results are not modelled: a trial that a
scheduler stopped early stands for its config with its last value (use :class:`~dtune.search.
BOHB` to learn across fidelities). ``sample_from`` leaves are computed from the values Optuna
chose, as in :func:`~dtune.tune.spaces.resolve`; they need no distribution of their own.

**Suggestions wait for results.** A model needs data, and a runner with many free slots would
otherwise ask it for config after config before any trial has finished, so model-based search
would silently become random search (Ray Tune issues #14770 and #52535). Here the first
``n_startup_trials`` suggestions are the sampler's random start-up; after those, ``suggest``
returns None (the slot stays free and the runner asks again when results come in) until
``n_startup_trials`` trials have finished. From then on every suggestion sees every finished
trial, and TPE's constant liar spreads suggestions made while others still run. The random
sampler never waits. Cap parallelism further with :class:`~dtune.search.ConcurrencyLimiter`.

Example:
    >>> import dtune
    >>> searcher = dtune.search.Optuna("tpe", seed=0, n_startup_trials=8)
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import pickle
import random
from collections.abc import Iterator, Mapping
from typing import Any

import cloudpickle

from dtune.tune.schedulers._common import check_mode, check_number
from dtune.tune.search._base import Path, Points, Searcher, check_points
from dtune.tune.spaces import (
    Choice,
    Domain,
    Grid,
    LogUniform,
    QUniform,
    RandInt,
    Uniform,
    iter_leaves,
    resolve,
)

__all__ = ["Optuna", "OptunaSpace", "quiet_study"]

SAMPLERS = ("tpe", "cmaes", "gp", "random")
_PLAIN = (type(None), bool, int, float, str)


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError as exc:  # pragma: no cover - optuna is a dev dependency
        raise ImportError("dtune.search.Optuna needs optuna: pip install 'dtune[optuna]'.") from exc
    return optuna


class OptunaSpace:
    """dtune's param space as Optuna distributions, with conversions both ways.

    Parameter names are key paths joined with ``/``. ``choice`` categories that Optuna cannot
    store (lists, dicts, objects) are represented by their index.
    """

    def __init__(self, space: Mapping[str, Any]) -> None:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        self.space = space
        self.distributions: dict[str, Any] = {}
        self.paths: dict[str, Path] = {}
        self._categories: dict[str, tuple[Any, ...]] = {}  # choices stored by index
        for path, leaf in iter_leaves(space):
            name = "/".join(path)
            where = "param_space" + "".join(f"[{key!r}]" for key in path)
            if isinstance(leaf, Grid):
                raise ValueError(f"{where} is a grid(), which Optuna cannot sample; use choice().")
            if isinstance(leaf, Uniform):
                dist: Any = FloatDistribution(leaf.low, leaf.high)
            elif isinstance(leaf, LogUniform):
                dist = FloatDistribution(leaf.low, leaf.high, log=True)
            elif isinstance(leaf, QUniform):
                low, high = math.ceil(leaf.low / leaf.q) * leaf.q, math.floor(leaf.high / leaf.q) * leaf.q
                if low > high:
                    raise ValueError(f"{where}: no multiple of q={leaf.q} lies in [{leaf.low}, {leaf.high}].")
                dist = FloatDistribution(low, high, step=leaf.q)
            elif isinstance(leaf, RandInt):
                dist = IntDistribution(leaf.low, leaf.high - 1)
            elif isinstance(leaf, Choice):
                if all(type(c) in _PLAIN for c in leaf.categories):
                    dist = CategoricalDistribution(leaf.categories)
                else:
                    self._categories[name] = leaf.categories
                    dist = CategoricalDistribution(tuple(range(len(leaf.categories))))
            elif isinstance(leaf, Domain):
                continue  # sample_from: computed by resolve() from the values chosen here
            else:
                continue  # a constant
            self.distributions[name], self.paths[name] = dist, path

    def to_fixed(self, params: Mapping[str, Any]) -> dict[Path, Any]:
        """Optuna params -> ``{path: value}`` for :func:`resolve`."""
        fixed = {}
        for name, value in params.items():
            if name in self._categories:
                value = self._categories[name][value]
            fixed[self.paths[name]] = value
        return fixed

    def to_params(self, fixed: Mapping[Path, Any]) -> dict[str, Any]:
        """``{path: value}`` (e.g. a point to evaluate) -> Optuna params."""
        params = {}
        for path, value in fixed.items():
            name = "/".join(path)
            if name not in self.distributions:
                continue  # a constant or a sample_from leaf: not Optuna's to know
            params[name] = self._categories[name].index(value) if name in self._categories else value
        return params

    def params_of(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The Optuna params of a resolved config (read at each distribution's path)."""
        fixed = {}
        for path in self.paths.values():
            node: Any = config
            for key in path:
                node = node[key]
            fixed[path] = node
        return self.to_params(fixed)

    def config(self, params: Mapping[str, Any], rng: random.Random) -> dict[str, Any]:
        return resolve(self.space, rng, fixed=self.to_fixed(params))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    logger = logging.getLogger("optuna.storages._in_memory")  # "A new study created ..."
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def quiet_study(mode: str, sampler: Any) -> Any:
    """An in-memory Optuna study for ``mode``, created without Optuna's INFO line."""
    optuna = _import_optuna()
    with _quiet():
        return optuna.create_study(direction="minimize" if mode == "min" else "maximize", sampler=sampler)


def make_sampler(sampler: Any, seed: int | None, n_startup_trials: int) -> Any:
    optuna = _import_optuna()
    if not isinstance(sampler, str):
        return sampler
    if sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials, constant_liar=True)
    if sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=n_startup_trials)
    if sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials)
    return optuna.samplers.RandomSampler(seed=seed)


def _value(result: Mapping[str, Any] | None, metric: str | None) -> float | None:
    value = None if result is None or metric is None else result.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


class Optuna(Searcher):
    """An Optuna sampler as a dtune searcher (see the module docstring).

    ``sampler`` is ``"tpe"``, ``"cmaes"``, ``"gp"``, ``"random"`` or an Optuna sampler
    instance (then ``seed`` and ``n_startup_trials`` configure only the waiting rule).

    Example:
        >>> import dtune
        >>> results = dtune.run(train, param_space={"x": dtune.uniform(0, 1)}, metric="loss",
        ...                     mode="min", num_samples=40,
        ...                     search=dtune.search.Optuna("tpe", seed=0))  # doctest: +SKIP
    """

    def __init__(
        self,
        sampler: Any = "tpe",
        *,
        seed: int | None = None,
        n_startup_trials: int = 10,
        points_to_evaluate: Points = None,
        metric: str | None = None,
        mode: str | None = None,
    ) -> None:
        optuna = _import_optuna()
        if isinstance(sampler, str) and sampler not in SAMPLERS:
            raise ValueError(f"The value of `sampler` is {sampler!r}, but must be one of {SAMPLERS}.")
        if not isinstance(sampler, (str, optuna.samplers.BaseSampler)):
            raise TypeError(f"`sampler` must be a name or an optuna sampler, got {type(sampler).__name__}.")
        if sampler == "cmaes" and importlib.util.find_spec("cmaes") is None:
            raise ImportError("Optuna's CMA-ES sampler needs the cmaes package: pip install cmaes.")
        check_number("n_startup_trials", n_startup_trials, low=0, integer=True)
        check_mode(mode)
        self.sampler, self.seed, self.n_startup_trials = sampler, seed, n_startup_trials
        self.points_to_evaluate = check_points(points_to_evaluate)
        self.metric, self.mode = metric, mode
        self.waits = not isinstance(sampler, optuna.samplers.RandomSampler) and sampler != "random"
        self.study: Any = None
        self._space: OptunaSpace | None = None
        self._rng = random.Random(seed)
        self._points: list[dict[Path, Any]] = []
        self._remaining = 0
        self._asked = 0
        self._finished = 0
        self._numbers: dict[str, int] = {}  # dtune trial id -> optuna trial number
        self._state: bytes | None = None  # get_state's cache, cleared by every change

    def set_search_properties(
        self, *, metric: str, mode: str, param_space: Mapping[str, Any], num_samples: int, seed: int | None
    ) -> None:
        super().set_search_properties(
            metric=metric, mode=mode, param_space=param_space, num_samples=num_samples, seed=seed
        )
        self._adopt_run_seed(seed)
        self._space = OptunaSpace(param_space)
        self._points = self._initial_points(param_space)
        self._remaining = num_samples
        sampler = make_sampler(self.sampler, self.seed, self.n_startup_trials)
        self.study = quiet_study(self.mode or mode, sampler)
        self._state = None

    @property
    def waiting(self) -> bool:
        """Whether :meth:`suggest` holds back until more trials finish (see the module docstring)."""
        return self.waits and self._asked >= self.n_startup_trials > self._finished

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self._space is None:
            raise RuntimeError("Optuna.suggest() before set_search_properties(); dtune.run calls it.")
        if self._remaining <= 0 or (not self._points and self.waiting):
            return None
        if self._points:
            self.study.enqueue_trial(self._space.to_params(self._points.pop(0)))
        trial = self.study.ask(self._space.distributions)
        self._numbers[trial_id] = trial.number
        self._remaining, self._asked, self._state = self._remaining - 1, self._asked + 1, None
        return self._space.config(trial.params, self._rng)

    @property
    def is_finished(self) -> bool:
        return self._space is not None and self._remaining <= 0

    def on_complete(self, trial_id: str, result: dict[str, Any] | None, error: bool = False) -> None:
        number = self._numbers.pop(trial_id, None)
        if number is None:
            return
        from optuna.trial import TrialState

        value = None if error else _value(result, self.metric)
        if value is None:
            self.study.tell(number, state=TrialState.FAIL)
        else:
            self.study.tell(number, value)
        self._finished, self._state = self._finished + 1, None

    def get_state(self) -> bytes:
        if self._state is None:  # the study pickles whole: a restore continues exactly
            self._state = bytes(cloudpickle.dumps({k: v for k, v in self.__dict__.items() if k != "_state"}))
        return self._state

    def set_state(self, state: bytes) -> None:
        self.__dict__.update(pickle.loads(state))
        self._state = None
