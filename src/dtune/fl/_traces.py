"""Device traces on a slotted virtual clock, and the timing model that turns them into rounds.

A trace gives, for every client and every slot of ``step_s`` seconds, its training throughput
(samples/s), its uplink bandwidth (Mbit/s) and whether it is available (online, idle, charging:
FedScale's notion, after the FLASH behaviour trace). Values are constant within a slot, so the time
to do an amount of work is found exactly by integrating the piecewise-constant rate; that is what
lets a test decide a round's validity by hand. Traces wrap around (``t`` is taken modulo the trace
length), as FedScale's behaviour traces do with ``finish_time``.

Everything is vectorised over clients: a round for a thousand clients is a few array operations,
never a process or a Python loop per client.

Reference: Lai et al., "FedScale: Benchmarking Model and System Performance of Federated
Learning at Scale", ICML 2022 (the trace-driven virtual-clock simulation this follows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["PhaseTimes", "TraceSet", "available_until", "gather_window", "time_to_finish"]

_EPS = 1e-9


@dataclass(frozen=True, eq=False)
class TraceSet:
    """Per-client, per-slot device behaviour: the ground truth the simulator runs on.

    Args:
        step_s: slot length in seconds; values are constant within a slot.
        speed: ``(clients, slots)`` training throughput in samples per second.
        bandwidth: ``(clients, slots)`` uplink bandwidth in Mbit/s.
        available: ``(clients, slots)`` whether the client can take part during the slot.
        start_s: when federated training begins. The slots before it are the history that each
            client has observed of itself (and only of itself) before the first round.
        day_s: the length of a day on this clock. Clients know the time of day, so forecasters
            may use it; generated traces may compress the day to keep runs short.

    Example:
        >>> import numpy as np
        >>> traces = TraceSet(step_s=10.0, speed=np.full((2, 6), 5.0),
        ...                   bandwidth=np.full((2, 6), 8.0), available=np.ones((2, 6), bool))
        >>> traces.num_clients, traces.duration_s
        (2, 60.0)
    """

    step_s: float
    speed: np.ndarray
    bandwidth: np.ndarray
    available: np.ndarray
    start_s: float = 0.0
    day_s: float = 86400.0

    def __post_init__(self) -> None:
        if not (isinstance(self.step_s, (int, float)) and self.step_s > 0):
            raise ValueError(f"The value of `step_s` is {self.step_s!r}, but must be > 0.")
        if not (isinstance(self.day_s, (int, float)) and self.day_s > 0):
            raise ValueError(f"The value of `day_s` is {self.day_s!r}, but must be > 0.")
        shape = np.shape(self.speed)
        if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
            raise ValueError(f"`speed` must be a (clients, slots) array, got shape {shape}.")
        for name in ("bandwidth", "available"):
            if np.shape(getattr(self, name)) != shape:
                raise ValueError(
                    f"`{name}` has shape {np.shape(getattr(self, name))}, but must match `speed` {shape}."
                )
        object.__setattr__(self, "speed", np.asarray(self.speed, dtype=np.float64))
        object.__setattr__(self, "bandwidth", np.asarray(self.bandwidth, dtype=np.float64))
        object.__setattr__(self, "available", np.asarray(self.available, dtype=bool))
        if not (np.all(np.isfinite(self.speed)) and np.all(self.speed >= 0)):
            raise ValueError("`speed` must be finite and >= 0 everywhere.")
        if not (np.all(np.isfinite(self.bandwidth)) and np.all(self.bandwidth >= 0)):
            raise ValueError("`bandwidth` must be finite and >= 0 everywhere.")
        if not 0 <= self.start_s < self.duration_s:
            raise ValueError(
                f"The value of `start_s` is {self.start_s!r}, but must be in [0, {self.duration_s}) "
                "(the trace length)."
            )

    @property
    def num_clients(self) -> int:
        return int(self.speed.shape[0])

    @property
    def num_slots(self) -> int:
        return int(self.speed.shape[1])

    @property
    def duration_s(self) -> float:
        return self.num_slots * float(self.step_s)

    def slot(self, t: float) -> int:
        """The (unwrapped) slot index holding virtual time ``t``."""
        return math.floor(t / self.step_s + _EPS)

    def at(self, t: float, clients: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(speed, bandwidth, available) of ``clients`` (all by default) at time ``t``."""
        column = self.slot(t) % self.num_slots
        rows = slice(None) if clients is None else np.asarray(clients)
        return self.speed[rows, column], self.bandwidth[rows, column], self.available[rows, column]

    def subset(self, clients: np.ndarray) -> TraceSet:
        """The traces of ``clients`` only (e.g. to hand-check a few)."""
        rows = np.asarray(clients)
        return TraceSet(
            step_s=self.step_s, speed=self.speed[rows], bandwidth=self.bandwidth[rows],
            available=self.available[rows], start_s=self.start_s, day_s=self.day_s,
        )  # fmt: skip

    def phase_times(
        self,
        clients: np.ndarray,
        start_s: float,
        work: np.ndarray | float,
        upload_mbit: float,
        limit_s: float,
    ) -> PhaseTimes:
        """Exact training and reporting times of ``clients`` for a round starting at ``start_s``.

        Training does ``work`` samples at the traced speed; reporting then uploads ``upload_mbit``
        at the traced bandwidth. A phase not finished within ``limit_s`` of the round start has
        time ``inf``. ``online_s`` is how long each client stayed available from the round start
        (at most ``limit_s``).
        """
        clients = np.asarray(clients, dtype=np.int64)
        n = len(clients)
        work_arr = np.broadcast_to(np.asarray(work, dtype=np.float64), (n,))
        first = np.full(n, self.slot(start_s), dtype=np.int64)
        offset = np.full(n, start_s - first[0] * self.step_s)
        slots = math.ceil(limit_s / self.step_s) + 2
        train = time_to_finish(
            gather_window(self.speed, clients, first, slots), offset, work_arr, self.step_s
        )
        train[train > limit_s] = np.inf
        report = np.full(n, np.inf)
        done = np.isfinite(train)
        if done.any():
            begin = start_s + train[done]
            first2 = np.floor(begin / self.step_s + _EPS).astype(np.int64)
            offset2 = begin - first2 * self.step_s
            report[done] = time_to_finish(
                gather_window(self.bandwidth, clients[done], first2, slots),
                offset2,
                np.full(int(done.sum()), float(upload_mbit)),
                self.step_s,
            )
        total = train + report
        total[total > limit_s] = np.inf
        report[~np.isfinite(total)] = np.inf
        online = np.minimum(
            available_until(gather_window(self.available, clients, first, slots), offset, self.step_s),
            limit_s,
        )
        return PhaseTimes(train_s=train, report_s=report, online_s=online)


@dataclass(frozen=True)
class PhaseTimes:
    """What a round costs each of a set of clients (arrays aligned with the clients)."""

    train_s: np.ndarray
    report_s: np.ndarray
    online_s: np.ndarray

    @property
    def total_s(self) -> np.ndarray:
        return np.asarray(self.train_s + self.report_s)

    def valid(self, deadline_s: float) -> np.ndarray:
        """Valid participants: finish both phases by the deadline without leaving."""
        total = self.total_s
        return np.asarray((total <= deadline_s + _EPS) & (self.online_s >= total - _EPS))

    def dropped(self, deadline_s: float) -> np.ndarray:
        """Dropouts: left (became unavailable) before finishing and before the deadline."""
        return np.asarray(self.online_s < np.minimum(self.total_s, deadline_s) - _EPS)


def gather_window(values: np.ndarray, rows: np.ndarray, first: np.ndarray, length: int) -> np.ndarray:
    """``values[rows[i], (first[i] + j) % T]`` for ``j < length``: each client's next slots."""
    columns = (np.asarray(first)[:, None] + np.arange(length)[None, :]) % values.shape[1]
    return np.asarray(values[np.asarray(rows)[:, None], columns])


def time_to_finish(rates: np.ndarray, offset_s: np.ndarray, amount: np.ndarray, step_s: float) -> np.ndarray:
    """Seconds to accumulate ``amount`` at piecewise-constant ``rates`` (one row per client).

    ``rates[i, 0]`` holds for the rest of the first slot (from ``offset_s[i]`` into it), then each
    next column for a whole slot. Returns ``inf`` where the window is too short to finish.
    """
    rates = np.asarray(rates, dtype=np.float64)
    n, m = rates.shape
    offset_s = np.asarray(offset_s, dtype=np.float64)
    seconds = np.full((n, m), float(step_s))
    seconds[:, 0] = step_s - offset_s
    done = np.cumsum(rates * seconds, axis=1)
    before = done - rates * seconds
    begins = np.cumsum(seconds, axis=1) - seconds
    amount = np.asarray(amount, dtype=np.float64)
    reached = done >= amount[:, None] - _EPS * np.maximum(1.0, amount[:, None])
    finishes = reached.any(axis=1)
    j = np.argmax(reached, axis=1)
    rows = np.arange(n)
    rate = rates[rows, j]
    with np.errstate(divide="ignore", invalid="ignore"):
        within = np.where(rate > 0, (amount - before[rows, j]) / rate, 0.0)
    elapsed = begins[rows, j] + np.clip(within, 0.0, None)
    elapsed[amount <= 0] = 0.0
    return np.where(finishes | (amount <= 0), elapsed, np.inf)


def available_until(flags: np.ndarray, offset_s: np.ndarray, step_s: float) -> np.ndarray:
    """Seconds from the start until the first unavailable slot (the window end if none)."""
    flags = np.asarray(flags, dtype=bool)
    _n, m = flags.shape
    begins = (
        np.arange(m, dtype=np.float64)[None, :] * step_s - np.asarray(offset_s, dtype=np.float64)[:, None]
    )
    begins[:, 0] = 0.0
    first_off = np.where(~flags, begins, np.inf).min(axis=1)
    return np.asarray(np.minimum(first_off, m * step_s - np.asarray(offset_s)))
