"""The searcher contract: configs in, metrics back; a searcher never sees processes."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import Any

import cloudpickle

__all__ = ["Searcher"]


class Searcher:
    """Proposes configs for new trials and learns from their results.

    :meth:`suggest` returns a config, or ``None`` when it has nothing to propose *right now*
    (e.g. a model-based searcher waiting for results); :attr:`is_finished` tells the runner that
    no more configs will ever come. ``metric``, ``mode``, the param space, ``num_samples`` and
    the seed reach the searcher once through :meth:`set_search_properties`.
    """

    #: Whether the searcher expands ``grid()`` values; the runner refuses grids otherwise.
    supports_grid: bool = False

    metric: str | None = None
    mode: str | None = None

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
