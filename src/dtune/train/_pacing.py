"""How long ShadowSync's shadow thread rests between syncs.

ShadowSync (Zheng et al., arXiv 2003.03477) syncs as fast as the link allows, on the premise
that the sync uses resources training does not need. On a host short of cores, or on a link
the training thread also needs (lookups on embedding servers), each sync slows training down.
Two ways to bound that:

- a fixed duty cycle (:func:`pause_after`): busy ``d`` of the time, whatever a sync costs;
- a slowdown budget (:class:`SlowdownPacer`): measure how fast training steps while a sync is
  in flight and while the thread rests, and pick the duty cycle at which training loses at most
  ``max_slowdown`` of its undisturbed rate. If syncing costs training nothing the thread syncs
  nearly back to back; if a sync stalls training completely it is busy ``max_slowdown`` of the
  time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["SlowdownPacer", "pause_after"]


def pause_after(recent_sync_s: Sequence[float], duty_cycle: float) -> float:
    """How long the shadow thread rests after a sync to stay busy ``duty_cycle`` of the time.

    The cost of a sync is the fastest of the recent ones: a paired round (MA, BMUF) also lasts
    while it waits for the slower peer, and that peer may be resting. Pacing on the raw duration
    would feed each trainer's rest into the other's next round, and the rate would collapse.
    """
    return min(recent_sync_s) * (1.0 / duty_cycle - 1.0) if recent_sync_s else 0.0


class SlowdownPacer:
    """The duty cycle that keeps training's step rate within ``max_slowdown`` of its rate at rest.

    Training runs at rate ``r_rest`` while the thread rests and ``r_sync`` while a sync is in
    flight; busy a fraction ``d`` of the time, it keeps ``1 - d * s`` of its rate, where
    ``s = 1 - r_sync / r_rest``. So ``d = max_slowdown / s``, at most ``ceiling``. The rates are
    step counts over time in both states, discounted by their age (time constant ``memory_s``),
    so a step landing in a short window counts in proportion to the window's length: no bias
    from rounding to whole steps. For the first ``warmup_s`` of observations the thread syncs at
    ``warmup_factor * max_slowdown``, which measures both rates quickly and costs at most that
    much, even if a sync stalls training. ``ceiling`` stays below 1 so that the thread keeps
    resting a little and the rate at rest stays measured.

    Example:
        >>> pacer = SlowdownPacer(max_slowdown=0.05)
        >>> round(pacer.duty_cycle(), 3)  # nothing measured yet: the warm-up rate
        0.15
        >>> for _ in range(50):  # training steps at half speed while a sync is in flight
        ...     pacer.record(synced_s=0.01, sync_steps=0.5, rested_s=0.19, rest_steps=19.0)
        >>> round(pacer.duty_cycle(), 3)
        0.1
    """

    __slots__ = (
        "ceiling", "max_slowdown", "memory_s", "observed_s", "rest_s", "rest_steps", "sync_s",
        "sync_steps", "warmup_factor", "warmup_s",
    )  # fmt: skip

    def __init__(
        self,
        max_slowdown: float,
        *,
        memory_s: float = 3.0,
        warmup_s: float = 1.0,
        warmup_factor: float = 3.0,
        ceiling: float = 0.9,
    ) -> None:
        if not 0 < max_slowdown < 1:
            raise ValueError(f"The value of `max_slowdown` is {max_slowdown}, but must be in (0, 1).")
        self.max_slowdown = max_slowdown
        self.memory_s = memory_s
        self.warmup_s = warmup_s
        self.warmup_factor = warmup_factor
        self.ceiling = ceiling
        self.sync_s = self.sync_steps = self.rest_s = self.rest_steps = self.observed_s = 0.0

    def record(self, *, synced_s: float, sync_steps: float, rested_s: float, rest_steps: float) -> None:
        """One sync and the rest after it: how long each took and how many steps training made."""
        keep = math.exp(-(synced_s + rested_s) / self.memory_s) if math.isfinite(self.memory_s) else 1.0
        self.sync_s = keep * self.sync_s + synced_s
        self.sync_steps = keep * self.sync_steps + sync_steps
        self.rest_s = keep * self.rest_s + rested_s
        self.rest_steps = keep * self.rest_steps + rest_steps
        self.observed_s += synced_s + rested_s

    def slowdown(self) -> float | None:
        """The fraction of its rate training loses while a sync is in flight (None: unknown yet)."""
        if self.sync_s <= 0 or self.rest_s <= 0 or self.rest_steps <= 0:
            return None
        rest_rate = self.rest_steps / self.rest_s
        return min(1.0, max(0.0, 1.0 - (self.sync_steps / self.sync_s) / rest_rate))

    def duty_cycle(self) -> float:
        s = self.slowdown()
        if s is None or self.observed_s < self.warmup_s:
            return min(self.ceiling, self.warmup_factor * self.max_slowdown)
        return self.ceiling if s <= self.max_slowdown / self.ceiling else self.max_slowdown / s
