"""Cap how many of a searcher's trials are unfinished at once.

Ray Tune's ``ConcurrencyLimiter`` answers the same need (Ray Tune issues #10256, #10270): a
model-based searcher is only as good as the results it has seen when it proposes, so capping
the trials in flight trades parallelism for better-informed suggestions.

Example:
    >>> import dtune
    >>> searcher = dtune.search.ConcurrencyLimiter(dtune.search.Optuna("tpe", seed=0), max_concurrent=2)
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import Any

import cloudpickle

from dtune.tune.schedulers._common import check_number
from dtune.tune.search._base import Searcher

__all__ = ["ConcurrencyLimiter"]


class ConcurrencyLimiter(Searcher):
    """Wraps ``searcher`` so that at most ``max_concurrent`` of its trials are unfinished.

    A trial counts from its suggestion until it completes or errors; a PAUSED trial still
    counts. While the cap is reached :meth:`suggest` returns None and the slot stays free until
    a trial finishes. Everything else is the wrapped searcher's.

    Example:
        >>> import dtune
        >>> limited = dtune.search.ConcurrencyLimiter(dtune.search.Optuna(seed=0), max_concurrent=4)
        >>> dtune.run(train, param_space=space, metric="loss", mode="min", num_samples=50,
        ...           search=limited)  # doctest: +SKIP
    """

    def __init__(self, searcher: Searcher, max_concurrent: int) -> None:
        if not isinstance(searcher, Searcher):
            raise TypeError(f"`searcher` must be a dtune.search.Searcher, got {type(searcher).__name__}.")
        check_number("max_concurrent", max_concurrent, low=1, integer=True)
        self.searcher, self.max_concurrent = searcher, max_concurrent
        self._live: set[str] = set()

    @property
    def supports_grid(self) -> bool:  # type: ignore[override]
        return self.searcher.supports_grid

    @property
    def total(self) -> int:
        """The wrapped searcher's total number of configs, where it has one (Grid)."""
        return int(self.searcher.total)  # type: ignore[attr-defined]

    def set_search_properties(
        self, *, metric: str, mode: str, param_space: Mapping[str, Any], num_samples: int, seed: int | None
    ) -> None:
        self.searcher.set_search_properties(
            metric=metric, mode=mode, param_space=param_space, num_samples=num_samples, seed=seed
        )
        self.metric, self.mode = self.searcher.metric, self.searcher.mode

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if len(self._live) >= self.max_concurrent:
            return None
        config = self.searcher.suggest(trial_id)
        if config is not None:
            self._live.add(trial_id)
        return config

    @property
    def is_finished(self) -> bool:
        return self.searcher.is_finished

    def on_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self.searcher.on_result(trial_id, result)

    def on_complete(self, trial_id: str, result: dict[str, Any] | None, error: bool = False) -> None:
        self._live.discard(trial_id)
        self.searcher.on_complete(trial_id, result, error)

    def get_state(self) -> bytes:
        return bytes(cloudpickle.dumps((sorted(self._live), self.searcher.get_state())))

    def set_state(self, state: bytes) -> None:
        live, inner = pickle.loads(state)
        self._live = set(live)
        self.searcher.set_state(inner)
