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
    """Steers the duty cycle so that training loses at most ``max_slowdown`` of its steps.

    Training steps at rate ``r_rest`` while the thread rests and ``r_sync`` while a sync is in
    flight. Over recent time (step counts and durations of both states, discounted with time
    constant ``memory_s``) the steps lost are ``sync_s * r_rest - sync_steps`` out of
    ``(sync_s + rest_s) * r_rest``: the measured loss, whatever makes a sync costly (CPU, link)
    and however long the syncs really took. The duty cycle handed to :func:`pause_after` is
    scaled by ``(max_slowdown / loss) ** (elapsed / memory_s)`` after every sync and rest, so it
    settles where the measured loss meets the budget; a step landing in a short window counts in
    proportion to the window's length, so rounding to whole steps biases nothing. It starts at
    ``warmup_factor * max_slowdown``, stays within ``[floor, ceiling]``, and ``ceiling`` < 1
    keeps the thread resting a little so the rate at rest stays measured.

    Example:
        >>> pacer = SlowdownPacer(max_slowdown=0.05)
        >>> round(pacer.duty_cycle(), 3)  # the starting point
        0.15
        >>> for _ in range(300):  # training runs at half speed while a 10 ms sync is in flight
        ...     rest = pause_after([0.01], pacer.duty_cycle())
        ...     pacer.record(synced_s=0.01, sync_steps=0.5, rested_s=rest, rest_steps=100 * rest)
        >>> round(pacer.loss(), 3), round(pacer.duty_cycle(), 2)  # busy 10% of the time, losing 5%
        (0.05, 0.1)
    """

    __slots__ = (
        "ceiling", "duty", "floor", "max_slowdown", "memory_s", "rest_s", "rest_steps", "sync_s",
        "sync_steps",
    )  # fmt: skip

    def __init__(
        self,
        max_slowdown: float,
        *,
        memory_s: float = 2.0,
        warmup_factor: float = 3.0,
        floor: float = 1e-3,
        ceiling: float = 0.9,
    ) -> None:
        if not 0 < max_slowdown < 1:
            raise ValueError(f"The value of `max_slowdown` is {max_slowdown}, but must be in (0, 1).")
        self.max_slowdown = max_slowdown
        self.memory_s = memory_s
        self.floor = floor
        self.ceiling = ceiling
        self.duty = min(ceiling, warmup_factor * max_slowdown)
        self.sync_s = self.sync_steps = self.rest_s = self.rest_steps = 0.0

    def record(self, *, synced_s: float, sync_steps: float, rested_s: float, rest_steps: float) -> None:
        """One sync and the rest after it: how long each took and how many steps training made."""
        elapsed = synced_s + rested_s
        keep = math.exp(-elapsed / self.memory_s)  # 1 with an infinite memory
        self.sync_s = keep * self.sync_s + synced_s
        self.sync_steps = keep * self.sync_steps + sync_steps
        self.rest_s = keep * self.rest_s + rested_s
        self.rest_steps = keep * self.rest_steps + rest_steps
        loss = self.loss()
        if loss is None:
            return
        ratio = min(2.0, max(0.5, self.max_slowdown / max(loss, 1e-3)))
        step = ratio ** min(1.0, elapsed / self.memory_s)  # 1 (no change) with an infinite memory
        self.duty = min(self.ceiling, max(self.floor, self.duty * step))

    def _rest_rate(self) -> float | None:
        """Steps per second while the thread rests (None until both states were seen)."""
        if self.sync_s <= 0 or self.rest_s <= 0 or self.rest_steps <= 0:
            return None
        return self.rest_steps / self.rest_s

    def slowdown(self) -> float | None:
        """The fraction of its rate training loses while a sync is in flight (None: unknown yet)."""
        rest_rate = self._rest_rate()
        if rest_rate is None:
            return None
        return min(1.0, max(0.0, 1.0 - (self.sync_steps / self.sync_s) / rest_rate))

    def loss(self) -> float | None:
        """The fraction of its steps training lost to syncing, recently (None: unknown yet)."""
        rest_rate = self._rest_rate()
        if rest_rate is None:
            return None
        lost = self.sync_s * rest_rate - self.sync_steps
        return min(1.0, max(0.0, lost / ((self.sync_s + self.rest_s) * rest_rate)))

    def duty_cycle(self) -> float:
        """The duty cycle to pace the next rest with (see :func:`pause_after`)."""
        return self.duty
