"""Aggregators: how the server combines the round's client updates into one.

An aggregator gets the updates as rows of an ``(n, P)`` array (plus example counts) and returns a
``(P,)`` update. The robust ones hold their guarantee only for some ``n`` given the number ``f``
of Byzantine updates they are built to tolerate; they refuse any other ``n`` with a clear error
(``check(n)``), rather than silently returning something without the guarantee.

References: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017 (FedAvg); Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018 (coordinate-wise median and trimmed mean).
"""

from __future__ import annotations

import abc

import numpy as np

__all__ = ["Aggregator", "FedAvg", "Median", "TrimmedMean"]


def _check_f(f: int) -> None:
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(f"The value of `f` is {f!r}, but must be an integer >= 0.")


class Aggregator(abc.ABC):
    """Combines ``n`` client updates into one. Subclasses implement ``_aggregate``."""

    def min_clients(self) -> int:
        """The fewest updates this aggregator accepts."""
        return 1

    def check(self, n: int) -> None:
        """Raise ``ValueError`` if ``n`` updates are outside this aggregator's guarantee."""
        if n < self.min_clients():
            raise ValueError(f"{type(self).__name__} needs at least {self.min_clients()} updates, got n={n}.")

    def aggregate(self, updates: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """Aggregate ``updates`` ``(n, P)``; ``weights`` are example counts (used by FedAvg)."""
        updates = np.asarray(updates, dtype=np.float64)
        if updates.ndim != 2:
            raise ValueError(f"`updates` must be an (n, P) array, got shape {updates.shape}.")
        weights = np.ones(len(updates)) if weights is None else np.asarray(weights, dtype=np.float64)
        if weights.shape != (len(updates),) or np.any(weights < 0) or not np.all(np.isfinite(weights)):
            raise ValueError(f"`weights` must be {len(updates)} finite values >= 0, got {weights!r}.")
        self.check(len(updates))
        return self._aggregate(updates, weights)

    @abc.abstractmethod
    def _aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray: ...

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class FedAvg(Aggregator):
    """Example-weighted mean (McMahan et al.). One bad update can move it arbitrarily far.

    Example:
        >>> FedAvg().aggregate(np.array([[0.0, 2.0], [3.0, 5.0]]), weights=np.array([2, 1]))
        array([1., 3.])
    """

    def _aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        total = weights.sum()
        if total <= 0:
            return np.asarray(updates.mean(axis=0))
        return np.asarray((weights[:, None] * updates).sum(axis=0) / total)


class Median(Aggregator):
    """Coordinate-wise median (Yin et al.); ignores example counts.

    Robust while fewer than half of the updates are Byzantine: with ``f`` given, refuses
    ``n <= 2f``.

    Example:
        >>> Median().aggregate(np.array([[1.0, 9.0], [2.0, 0.0], [100.0, 1.0]]))
        array([2., 1.])
    """

    def __init__(self, *, f: int = 0) -> None:
        _check_f(f)
        self.f = f

    def min_clients(self) -> int:
        return 2 * self.f + 1

    def check(self, n: int) -> None:
        if n < self.min_clients():
            raise ValueError(
                f"The value of `f` is {self.f}, but must be < n/2 = {n / 2:g} for Median (n={n})."
            )

    def _aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return np.asarray(np.median(updates, axis=0))


class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean (Yin et al.): drop the ``floor(beta * n)`` largest and smallest
    values of each coordinate, average the rest; ignores example counts.

    Tolerates ``f`` Byzantine updates when ``floor(beta * n) >= f``; with ``f`` given, refuses
    smaller ``n``.

    Example:
        >>> TrimmedMean(beta=0.25).aggregate(np.array([[0.0], [1.0], [2.0], [50.0]]))
        array([1.5])
    """

    def __init__(self, *, beta: float = 0.2, f: int = 0) -> None:
        if not isinstance(beta, (int, float)) or not 0 <= beta < 0.5:
            raise ValueError(f"The value of `beta` is {beta!r}, but must be in [0, 0.5).")
        _check_f(f)
        self.beta, self.f = float(beta), f

    def _trimmed(self, n: int) -> int:
        return int(np.floor(self.beta * n + 1e-9))

    def min_clients(self) -> int:
        if self.f == 0:
            return 1
        # smallest n with floor(beta * n) >= f (and beta > 0, else none exists)
        return int(np.ceil(self.f / self.beta - 1e-9)) if self.beta > 0 else np.iinfo(np.int64).max

    def check(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"TrimmedMean needs at least 1 update, got n={n}.")
        if self._trimmed(n) < self.f:
            raise ValueError(
                f"The value of `f` is {self.f}, but must be <= floor(beta * n) = {self._trimmed(n)} "
                f"for TrimmedMean (n={n}, beta={self.beta:g})."
            )

    def _aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        k = self._trimmed(len(updates))
        ordered = np.sort(updates, axis=0)
        return np.asarray(ordered[k : len(updates) - k].mean(axis=0))
