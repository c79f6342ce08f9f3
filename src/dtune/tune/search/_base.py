"""The searcher contract: configs in, metrics back; a searcher never sees processes."""

from __future__ import annotations

import pickle
import random
from collections.abc import Mapping, Sequence
from typing import Any

import cloudpickle

from dtune.tune.spaces import Choice, iter_leaves

__all__ = ["Points", "Searcher", "check_points", "point_paths"]

Path = tuple[str, ...]
#: ``points_to_evaluate``: configs (possibly partial) that a searcher suggests first.
Points = Sequence[Mapping[str, Any]] | None


def check_points(points: Any) -> list[dict[str, Any]]:
    """Validate ``points_to_evaluate`` (a list of, possibly partial, configs) and copy it."""
    if points is None:
        return []
    if isinstance(points, Mapping) or not isinstance(points, Sequence):
        raise TypeError(f"`points_to_evaluate` must be a list of config dicts, got {type(points).__name__}.")
    for i, point in enumerate(points):
        if not isinstance(point, Mapping):
            raise TypeError(f"points_to_evaluate[{i}] must be a dict, got {type(point).__name__}.")
    return [dict(point) for point in points]


def point_paths(point: Mapping[str, Any], space: Mapping[str, Any], where: str) -> dict[Path, Any]:
    """A point as ``{path: value}`` over the space's leaves; a key the space lacks is an error.

    Nested dicts in the point address nested keys of the space. Values of ``choice`` leaves
    must be among the categories, since a model cannot place anything else.
    """
    leaves = dict(iter_leaves(space))
    out: dict[Path, Any] = {}
    for path, value in iter_leaves(point):
        name = where + "".join(f"[{key!r}]" for key in path)
        if path not in leaves:
            raise ValueError(f"{name} is not a key of param_space (keys: {['/'.join(p) for p in leaves]}).")
        leaf = leaves[path]
        if isinstance(leaf, Choice) and value not in leaf.categories:
            raise ValueError(f"{name} is {value!r}, which is not one of the choice() categories.")
        out[path] = value
    return out


class Searcher:
    """Proposes configs for new trials and learns from their results.

    :meth:`suggest` returns a config, or ``None`` when it has nothing to propose *right now*
    (e.g. a model-based searcher waiting for results); :attr:`is_finished` tells the runner that
    no more configs will ever come. ``metric``, ``mode``, the param space, ``num_samples`` and
    the seed reach the searcher once through :meth:`set_search_properties`.
    """

    #: Whether the searcher expands ``grid()`` values; the runner refuses grids otherwise.
    supports_grid: bool = False
    #: Configs to evaluate first (``points_to_evaluate``); every searcher takes them.
    points_to_evaluate: list[dict[str, Any]] = []

    metric: str | None = None
    mode: str | None = None
    seed: int | None = None
    _rng: random.Random

    def set_search_properties(
        self,
        *,
        metric: str,
        mode: str,
        param_space: Mapping[str, Any],
        num_samples: int,
        seed: int | None,
    ) -> None:
        if self.metric is None:
            self.metric = metric
        if self.mode is None:
            self.mode = mode

    def _adopt_run_seed(self, seed: int | None) -> None:
        """Searchers built without a seed take the run's (and reseed their owned generator)."""
        if self.seed is None and seed is not None:
            self.seed = seed
            self._rng = random.Random(seed)

    def _initial_points(self, param_space: Mapping[str, Any]) -> list[dict[Path, Any]]:
        """``points_to_evaluate`` as ``{path: value}`` over ``param_space``, checked against it."""
        return [
            point_paths(point, param_space, f"points_to_evaluate[{i}]")
            for i, point in enumerate(self.points_to_evaluate)
        ]

    def suggest(self, trial_id: str) -> dict[str, Any] | None:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def is_finished(self) -> bool:
        """True once :meth:`suggest` will never return a config again."""
        return False

    def on_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """An intermediate result of a trial this searcher suggested."""

    def on_complete(self, trial_id: str, result: dict[str, Any] | None, error: bool = False) -> None:
        """The trial ended; ``result`` is its last one (None if it never reported)."""

    def get_state(self) -> bytes:
        """Everything needed to carry on after a driver crash (the store persists it)."""
        return bytes(cloudpickle.dumps(self.__dict__))

    def set_state(self, state: bytes) -> None:
        self.__dict__.update(pickle.loads(state))
