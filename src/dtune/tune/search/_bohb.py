"""BOHB's model: a searcher that learns from results at every budget, for HyperBand.

Falkner, Klein, Hutter, "BOHB: Robust and Efficient Hyperparameter Optimization at Scale",
ICML 2018 (arXiv:1807.01774).

BOHB is HyperBand (:class:`~dtune.schedulers.HyperBand`) whose new configs come from a model
instead of uniform sampling. Every result a trial reports is an observation at the budget it
was reported at (its ``time_attr``, epochs by default), so the model learns from trials that
were stopped early as well as from those that ran to ``max_t``. A new config is proposed from
the observations at the *largest* budget that has at least ``min_points_in_model`` of them
(default: number of hyper-parameters + 2); a fraction ``random_fraction`` of configs is drawn
at random regardless, which keeps HyperBand's guarantees. The density model is Optuna's
multivariate TPE, one study per budget, in place of the paper's own KDE, with the paper's split
of the observations: the best ``max(d + 1, top_fraction n)`` of ``n`` are the "good" ones.

**Suggestions wait for results.** Until some budget has ``min_points_in_model`` observations,
at most that many random configs may be waiting for their first result; further calls return
None until they report. A trial that reported once (e.g. one HyperBand paused at its first
rung) no longer holds suggestions back, so HyperBand's brackets fill without waiting on them.

Example:
    >>> import dtune
    >>> scheduler = dtune.schedulers.HyperBand(max_t=27)
    >>> searcher = dtune.search.BOHB(seed=0)
"""

from __future__ import annotations

import math
import pickle
import random
from collections.abc import Mapping
from typing import Any

import cloudpickle

from dtune.tune.schedulers._common import check_mode, check_number
from dtune.tune.search._base import Path, Points, Searcher, check_points
from dtune.tune.search._optuna import OptunaSpace, _value, quiet_study
from dtune.tune.spaces import resolve

__all__ = ["BOHB"]


class BOHB(Searcher):
    """Model-based configs for HyperBand, learnt at every budget (see the module docstring).

    Example:
        >>> import dtune
        >>> dtune.run(train_with_checkpoints, param_space=space, metric="loss", mode="min",
        ...           num_samples=143, scheduler=dtune.schedulers.HyperBand(max_t=81),
        ...           search=dtune.search.BOHB(seed=0))  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        seed: int | None = None,
        min_points_in_model: int | None = None,
        random_fraction: float = 1 / 3,
        top_fraction: float = 0.15,
        points_to_evaluate: Points = None,
        time_attr: str = "training_iteration",
        metric: str | None = None,
        mode: str | None = None,
    ) -> None:
        if min_points_in_model is not None:
            check_number("min_points_in_model", min_points_in_model, low=1, integer=True)
        check_number("random_fraction", random_fraction, low=0, high=1)
        check_number("top_fraction", top_fraction, low=0, high=1, strict=True)
        check_mode(mode)
        self.seed, self.min_points_in_model, self.random_fraction = seed, min_points_in_model, random_fraction
        self.top_fraction = top_fraction
        self.points_to_evaluate = check_points(points_to_evaluate)
        self.time_attr, self.metric, self.mode = time_attr, metric, mode
        self._rng = random.Random(seed)
        self._space: OptunaSpace | None = None
        self._points: list[dict[Path, Any]] = []
        self._remaining = 0
        self._params: dict[str, dict[str, Any]] = {}  # trial -> its values as Optuna params
        self._unreported: set[str] = set()  # suggested, and neither reported nor finished yet
        self._obs: dict[float, dict[str, float]] = {}  # budget -> {trial: first value there}
        self._studies: dict[float, Any] = {}  # budget -> Optuna study fed with _obs[budget]
        self._fed: dict[float, int] = {}  # budget -> observations already in its study
        self.model_budgets: list[float | None] = []  # per suggestion: the budget modelled, None = random
        self._state: bytes | None = None

    def set_search_properties(
        self, *, metric: str, mode: str, param_space: Mapping[str, Any], num_samples: int, seed: int | None
    ) -> None:
        super().set_search_properties(
            metric=metric, mode=mode, param_space=param_space, num_samples=num_samples, seed=seed
        )
        self._adopt_run_seed(seed)
        self._space = OptunaSpace(param_space)
        if self.min_points_in_model is None:
            self.min_points_in_model = max(3, len(self._space.distributions) + 2)
        self._points = self._initial_points(param_space)
        self._remaining, self._state = num_samples, None

    def model_budget(self) -> float | None:
        """The largest budget with enough observations for a model, or None."""
        enough = [b for b, seen in self._obs.items() if len(seen) >= (self.min_points_in_model or 1)]
        return max(enough, default=None)

    def _sample_model(self, budget: float) -> dict[str, Any]:
        import optuna
        from optuna.trial import TrialState, create_trial

        assert self._space is not None
        dists = self._space.distributions
        study = self._studies.get(budget)
        if study is None:
            seed = self._rng.randrange(2**31)
            sampler = optuna.samplers.TPESampler(
                seed=seed, n_startup_trials=0, multivariate=True, gamma=self._good_points
            )
            study = self._studies[budget] = quiet_study(self.mode or "min", sampler)
        seen = list(self._obs[budget].items())
        for trial_id, value in seen[self._fed.get(budget, 0) :]:
            study.add_trial(create_trial(params=self._params[trial_id], distributions=dists, value=value))
        self._fed[budget] = len(seen)
        trial = study.ask(dists)
        study.tell(trial, state=TrialState.FAIL)  # a proposal, not an observation
        return dict(trial.params)

    def _good_points(self, n: int) -> int:
        """BOHB's split of ``n`` observations: the best ``max(d + 1, top_fraction n)`` are "good".

        Optuna's default (10%, at least 1) would fit the good density to one or two points of a
        few noisy ones at the top budget; the paper keeps at least d + 1 on each side.
        """
        dims = len(self._space.distributions) if self._space is not None else 1
        return max(1, min(n - 1, max(dims + 1, math.ceil(self.top_fraction * n))))

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self._space is None:
            raise RuntimeError("BOHB.suggest() before set_search_properties(); dtune.run calls it.")
        if self._remaining <= 0:
            return None
        budget = self.model_budget()
        if self._points:
            config = resolve(self._space.space, self._rng, fixed=self._points.pop(0))
            budget = None
        elif budget is not None and self._rng.random() >= self.random_fraction:
            config = self._space.config(self._sample_model(budget), self._rng)
        elif budget is None and len(self._unreported) >= (self.min_points_in_model or 1):
            return None  # enough random configs are out: wait for their first results
        else:
            config, budget = resolve(self._space.space, self._rng), None
        self._params[trial_id] = self._space.params_of(config)
        self._unreported.add(trial_id)
        self.model_budgets.append(budget)
        self._remaining, self._state = self._remaining - 1, None
        return config

    @property
    def is_finished(self) -> bool:
        return self._space is not None and self._remaining <= 0

    def on_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self._unreported.discard(trial_id)
        value, budget = _value(result, self.metric), result.get(self.time_attr)
        if value is None or budget is None or trial_id not in self._params:
            return
        seen = self._obs.setdefault(budget, {})
        if trial_id not in seen:  # a result repeated after a restore is not a new observation
            seen[trial_id], self._state = value, None

    def on_complete(self, trial_id: str, result: dict[str, Any] | None, error: bool = False) -> None:
        self._unreported.discard(trial_id)
        self._state = None

    def get_state(self) -> bytes:
        if self._state is None:
            self._state = bytes(cloudpickle.dumps({k: v for k, v in self.__dict__.items() if k != "_state"}))
        return self._state

    def set_state(self, state: bytes) -> None:
        self.__dict__.update(pickle.loads(state))
        self._state = None
