"""Random search: independent draws from the param space with a seeded, owned generator."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from dtune.tune.search._base import Path, Points, Searcher, check_points
from dtune.tune.spaces import resolve

__all__ = ["Random"]


class Random(Searcher):
    """Samples ``num_samples`` configs independently.

    ``points_to_evaluate`` (configs, possibly partial: missing keys are sampled) come first and
    count towards ``num_samples``.

    Example:
        >>> import dtune
        >>> searcher = dtune.search.Random(seed=0, points_to_evaluate=[{"lr": 0.01}])
    """

    def __init__(self, seed: int | None = None, points_to_evaluate: Points = None) -> None:
        self.seed = seed
        self.points_to_evaluate = check_points(points_to_evaluate)
        self._rng = random.Random(seed)
        self._space: Mapping[str, Any] = {}
        self._points: list[dict[Path, Any]] = []
        self._remaining = 0

    def set_search_properties(
        self,
        *,
        metric: str,
        mode: str,
        param_space: Mapping[str, Any],
        num_samples: int,
        seed: int | None,
    ) -> None:
        super().set_search_properties(
            metric=metric, mode=mode, param_space=param_space, num_samples=num_samples, seed=seed
        )
        self._adopt_run_seed(seed)
        self._space = param_space
        self._points = self._initial_points(param_space)
        self._remaining = num_samples

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self._remaining <= 0:
            return None
        self._remaining -= 1
        return resolve(self._space, self._rng, fixed=self._points.pop(0) if self._points else None)

    @property
    def is_finished(self) -> bool:
        return self._remaining <= 0
