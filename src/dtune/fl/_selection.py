"""The selection contract, and the two anchors: random (FedAvg) and reactive (FedCS) selection.

A :class:`Selector` picks up to ``num_select`` clients from the round's candidates (the clients
online now) using what the server observes (each candidate's current resources, turned into
estimated phase times as if they stayed constant) or what it asks clients to forecast
(``context.request_forecasts``: clients compute forecasts locally and send only those). After
the round it gets :class:`RoundFeedback`: who was valid, how long each took, Oort's statistical
utility, the accuracy gain.

References: McMahan et al., AISTATS 2017 (FedAvg: a uniformly random subset each round);
Nishio and Yonetani, "Client Selection for Federated Learning with Heterogeneous Resources in
Mobile Edge", ICC 2019 (FedCS: ask a random subset for resource information, then greedily
take the clients that fit the deadline).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dtune.fl._forecast import Estimates

__all__ = [
    "RandomSelector",
    "ReactiveSelector",
    "RoundFeedback",
    "SelectionContext",
    "Selector",
    "greedy_fit",
]


@dataclass(frozen=True)
class SelectionContext:
    """What the server knows when it selects for a round (arrays aligned with ``candidates``)."""

    round: int
    clock_s: float
    deadline_s: float
    num_select: int
    candidates: np.ndarray
    num_samples: np.ndarray
    observed: Estimates
    forecaster: Callable[[np.ndarray], Estimates] | None = field(default=None, repr=False)

    def request_forecasts(self, clients: np.ndarray) -> Estimates:
        """Ask ``clients`` (candidates) for their forecasts of this round's phase times."""
        if self.forecaster is None:
            raise RuntimeError(
                "This selector asks clients for forecasts, but the simulation has none: "
                "pass forecaster=LSTMForecaster(...) to the Simulator."
            )
        return self.forecaster(np.asarray(clients, dtype=np.int64))

    def observed_for(self, clients: np.ndarray) -> Estimates:
        """``observed`` restricted to ``clients`` (a subset of the candidates)."""
        index = np.searchsorted(self.candidates, clients)
        o = self.observed
        return Estimates(
            train_s=o.train_s[index], report_s=o.report_s[index], p_available=o.p_available[index]
        )


@dataclass(frozen=True)
class RoundFeedback:
    """What the server learned from a round (arrays aligned with ``selected``).

    ``duration_s`` is each client's realised time for both phases (``inf`` if it never finished
    within the simulation's horizon); ``utility`` is Oort's statistical utility of valid clients
    (``nan`` for the others); ``accuracy_gain`` the change of the global model's test accuracy.
    """

    round: int
    deadline_s: float
    selected: np.ndarray
    valid: np.ndarray
    dropped: np.ndarray
    duration_s: np.ndarray
    utility: np.ndarray
    accuracy_gain: float
    latency_s: float


class Selector(abc.ABC):
    """Picks the round's participants; may learn from each round's feedback."""

    @abc.abstractmethod
    def select(self, context: SelectionContext) -> np.ndarray:
        """Distinct client ids from ``context.candidates``, at most ``context.num_select``."""

    def feedback(self, feedback: RoundFeedback) -> None:  # noqa: B027 - optional hook
        """Learn from the round just played (no-op by default)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def request_pool(
    context: SelectionContext, pool_factor: float | None, rng: np.random.Generator
) -> np.ndarray:
    """FedCS's resource request: a random subset of ``pool_factor * num_select`` candidates
    (all candidates when ``pool_factor`` is None), sorted."""
    if pool_factor is None:
        return context.candidates
    size = min(len(context.candidates), math.ceil(pool_factor * context.num_select))
    return np.sort(rng.choice(context.candidates, size=size, replace=False))


def greedy_fit(estimates: Estimates, deadline_s: float, k: int, min_p_available: float = 0.0) -> np.ndarray:
    """Positions of up to ``k`` clients, fastest estimated first, preferring those estimated to
    finish by the deadline (and stay online with probability >= ``min_p_available``); if fewer
    fit, the fastest of the rest fill the round."""
    total = np.where(np.isfinite(estimates.total_s), estimates.total_s, np.finfo(float).max)
    fits = (total <= deadline_s) & (estimates.p_available >= min_p_available)
    order = np.lexsort((total, ~fits))  # fitting first, then by estimated time
    return order[: min(k, len(order))]


def _check_pool_factor(pool_factor: float | None) -> None:
    if pool_factor is not None and not pool_factor >= 1:
        raise ValueError(
            f"The value of `pool_factor` is {pool_factor!r}, but must be >= 1 (or None for all)."
        )


class RandomSelector(Selector):
    """FedAvg's selection: ``num_select`` candidates uniformly at random.

    Example:
        >>> selector = RandomSelector(seed=0)
    """

    def __init__(self, *, seed: int) -> None:
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def select(self, context: SelectionContext) -> np.ndarray:
        k = min(context.num_select, len(context.candidates))
        return np.sort(self._rng.choice(context.candidates, size=k, replace=False))


class ReactiveSelector(Selector):
    """FedCS-style reactive selection from currently observed resources.

    Asks the candidates (or, as FedCS's resource request, a random pool of ``pool_factor *
    num_select`` of them) for their current resources, estimates each one's phase times as if
    those resources stay as they are now, and greedily takes the fastest that fit the deadline.
    (FedCS schedules uploads one after another on a shared channel; here every client has its
    own uplink, so the greedy order is by time.)

    Example:
        >>> selector = ReactiveSelector(seed=0, pool_factor=3.0)  # FedCS: ask 30 random of them
    """

    def __init__(self, *, seed: int, pool_factor: float | None = None) -> None:
        _check_pool_factor(pool_factor)
        self.seed, self.pool_factor = seed, pool_factor
        self._rng = np.random.default_rng(seed)

    def select(self, context: SelectionContext) -> np.ndarray:
        pool = request_pool(context, self.pool_factor, self._rng)
        chosen = greedy_fit(context.observed_for(pool), context.deadline_s, context.num_select)
        return np.sort(pool[chosen])
