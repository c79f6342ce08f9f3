"""Krum, Multi-Krum and Bulyan: distance-based Byzantine-robust aggregation.

Krum scores each update by the sum of squared distances to its ``n - f - 2`` nearest neighbours
and keeps the best; Multi-Krum averages the ``m`` best. Bulyan selects ``theta = n - 2f`` updates
by repeated Krum and then, per coordinate, averages the ``theta - 2f`` values closest to the
median, which also bounds each coordinate's deviation (Krum alone bounds only the norm).

References: Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient
Descent", NeurIPS 2017 (Krum, n >= 2f + 3); El Mhamdi, Guerraoui and Rouault, "The Hidden
Vulnerability of Distributed Learning in Byzantium", ICML 2018 (Bulyan, n >= 4f + 3).
"""

from __future__ import annotations

import numpy as np

from dtune.fl._aggregation import Aggregator, _check_f

__all__ = ["Bulyan", "Krum", "MultiKrum", "krum_order", "krum_scores"]


def krum_scores(updates: np.ndarray, f: int) -> np.ndarray:
    """Krum score of each update: summed squared distance to its ``n - f - 2`` nearest others.

    At least one neighbour is always counted, so the score stays defined inside Bulyan's
    shrinking selection rounds.
    """
    squared = (updates**2).sum(axis=1)
    distances = np.maximum(squared[:, None] + squared[None, :] - 2 * updates @ updates.T, 0.0)
    np.fill_diagonal(distances, np.inf)
    neighbours = max(1, len(updates) - f - 2)
    return np.asarray(np.sort(distances, axis=1)[:, :neighbours].sum(axis=1))


def krum_order(updates: np.ndarray, f: int) -> np.ndarray:
    """Indices from the best (lowest) Krum score to the worst.

    Scores that are equal up to rounding are common (two mutual nearest neighbours score the
    same whenever one neighbour counts, as at the end of Bulyan's selection); they are ordered by
    the updates' values, so that the result does not depend on the order the updates arrived in.
    """
    scores = krum_scores(updates, f)
    keys = np.round(scores / max(float(scores.max()), 1e-300), 9)
    return np.lexsort((*updates.T[::-1], keys))


class Krum(Aggregator):
    """The single update with the lowest Krum score; ignores example counts.

    Example:
        >>> updates = np.array([[0.0], [0.1], [0.25], [0.3], [0.4], [0.6], [9.0]])
        >>> Krum(f=1).aggregate(updates)
        array([0.25])
    """

    def __init__(self, *, f: int) -> None:
        _check_f(f)
        self.f = f

    def min_clients(self) -> int:
        return 2 * self.f + 3

    def check(self, n: int) -> None:
        if n < 2 * self.f + 3:
            raise ValueError(
                f"The value of `f` is {self.f}, but must be <= (n - 3)/2 = {(n - 3) / 2:g} "
                f"for {type(self).__name__} (n={n})."
            )

    def _aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return np.array(updates[krum_order(updates, self.f)[0]])


class MultiKrum(Krum):
    """The mean of the ``m`` updates with the lowest Krum scores; ignores example counts.

    Needs ``n >= 2f + 3`` and ``m <= n - f`` (averaging more would have to include a Byzantine one).

    Example:
        >>> updates = np.array([[0.0], [0.1], [0.25], [0.3], [0.4], [0.6], [9.0]])
        >>> MultiKrum(f=1, m=2).aggregate(updates)
        array([0.275])
    """

    def __init__(self, *, f: int, m: int) -> None:
        super().__init__(f=f)
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"The value of `m` is {m!r}, but must be an integer >= 1.")
        self.m = m

    def min_clients(self) -> int:
        return max(2 * self.f + 3, self.m + self.f)

    def check(self, n: int) -> None:
        super().check(n)
        if self.m > n - self.f:
            raise ValueError(
                f"The value of `m` is {self.m}, but must be <= n - f = {n - self.f} for MultiKrum (n={n})."
            )

    def _aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        best = krum_order(updates, self.f)[: self.m]
        return np.asarray(updates[best].mean(axis=0))


class Bulyan(Aggregator):
    """Krum-selected, median-centred coordinate-wise trimmed mean; ignores example counts.

    Example:
        >>> updates = np.array([[0.0], [0.1], [0.25], [0.3], [0.4], [0.6], [9.0]])
        >>> Bulyan(f=1).aggregate(updates).round(4)
        array([0.2167])
    """

    def __init__(self, *, f: int) -> None:
        _check_f(f)
        self.f = f

    def min_clients(self) -> int:
        return 4 * self.f + 3

    def check(self, n: int) -> None:
        if n < self.min_clients():
            raise ValueError(
                f"The value of `f` is {self.f}, but must be <= (n - 3)/4 = {(n - 3) / 4:g} "
                f"for Bulyan (n={n})."
            )

    def selection(self, updates: np.ndarray) -> np.ndarray:
        """Indices of the ``n - 2f`` updates chosen by repeated Krum, in the order chosen."""
        remaining = list(range(len(updates)))
        chosen: list[int] = []
        while len(chosen) < len(updates) - 2 * self.f:
            best = int(krum_order(updates[remaining], self.f)[0])
            chosen.append(remaining.pop(best))
        return np.asarray(chosen)

    def _aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        selected = updates[self.selection(updates)]
        keep = len(selected) - 2 * self.f
        median = np.median(selected, axis=0)
        # per coordinate, the values nearest the median (equally near ones: the smaller first)
        closest = np.lexsort((selected, np.abs(selected - median[None, :])), axis=0)[:keep]
        return np.asarray(np.take_along_axis(selected, closest, axis=0).mean(axis=0))
