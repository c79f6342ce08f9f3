"""The adaptive deadline of a bounded-loss reduction: a multiple of recent completion times.

In DLCP (Wang et al., "Domain-specific Communication Optimization for Distributed DNN
Training") a receiver stops waiting for the last packets once enough have arrived; *when* to
stop must follow the network, or a fixed deadline either cuts healthy steps short or waits
out every tail. Here the deadline of a reduction is ``factor`` times the median time that
recent reductions of the same bucket took to become complete enough, clamped to
``[floor_s, ceil_s]``; it starts at ``initial_s``.
"""

from __future__ import annotations

import collections
import statistics

__all__ = ["AdaptiveDeadline"]


class AdaptiveDeadline:
    """Deadlines from the last ``window`` completion times.

    Example:
        >>> from dtune.comm.dlcp import AdaptiveDeadline
        >>> deadline = AdaptiveDeadline(initial_s=0.1, factor=2.0, floor_s=0.001, ceil_s=1.0)
        >>> deadline.seconds()
        0.1
        >>> for t in (0.010, 0.012, 0.011):
        ...     deadline.record(t)
        >>> round(deadline.seconds(), 3)
        0.022
    """

    __slots__ = ("ceil_s", "factor", "floor_s", "initial_s", "recent")

    def __init__(
        self, *, initial_s: float, factor: float, floor_s: float, ceil_s: float, window: int = 16
    ) -> None:
        self.initial_s = initial_s
        self.factor = factor
        self.floor_s = floor_s
        self.ceil_s = ceil_s
        self.recent: collections.deque[float] = collections.deque(maxlen=window)

    def record(self, duration_s: float) -> None:
        """A reduction became complete enough ``duration_s`` after every sender had started."""
        self.recent.append(max(0.0, duration_s))

    def seconds(self) -> float:
        if not self.recent:
            return self.initial_s
        return min(self.ceil_s, max(self.floor_s, self.factor * statistics.median(self.recent)))
