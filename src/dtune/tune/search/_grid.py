"""Grid search: the cartesian product of every ``grid()`` value, repeated ``num_samples`` times."""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping
from typing import Any

from dtune.tune.search._base import Points, Searcher, check_points
from dtune.tune.spaces import grid_keys, resolve

__all__ = ["Grid"]


class Grid(Searcher):
    """Enumerates grid points; other domains in the space are sampled at random per point.

    With ``num_samples=n`` every grid point is run ``n`` times (Ray Tune's convention), so the
    number of trials is ``n`` times the product of the grid sizes, plus ``points_to_evaluate``
    (run first; each must give every ``grid()`` key).

    Example:
        >>> import dtune
        >>> space = {"lr": dtune.grid([0.1, 0.01]), "width": dtune.grid([32, 64])}
        >>> searcher = dtune.search.Grid()  # 4 configs per sample
    """

    supports_grid = True

    def __init__(self, seed: int | None = None, points_to_evaluate: Points = None) -> None:
        self.seed = seed
        self.points_to_evaluate = check_points(points_to_evaluate)
        self._rng = random.Random(seed)
        self._space: Mapping[str, Any] = {}
        self._points: list[dict[tuple[str, ...], Any]] = []
        self._next = 0

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
        grids = grid_keys(param_space)
        product = itertools.product(*(leaf.values for _, leaf in grids))
        points = [dict(zip((path for path, _ in grids), values, strict=True)) for values in product]
        first = []
        for i, fixed in enumerate(self._initial_points(param_space)):
            missing = ["/".join(path) for path, _ in grids if path not in fixed]
            if missing:
                raise ValueError(f"points_to_evaluate[{i}] must give every grid() key; it lacks {missing}.")
            first.append(fixed)
        self._points = first + points * num_samples

    @property
    def total(self) -> int:
        """How many configs this searcher will suggest in all."""
        return len(self._points)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self._next >= len(self._points):
            return None
        point = self._points[self._next]
        self._next += 1
        return resolve(self._space, self._rng, fixed=point)

    @property
    def is_finished(self) -> bool:
        return self._next >= len(self._points)
