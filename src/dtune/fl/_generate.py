"""Generated device traces: predictable dynamics, and an i.i.d. control where prediction cannot help.

No public FL device trace can be downloaded here (FedScale's pickles live in its Git repository,
not in its wheel), so dtune generates traces in the same model and converts FedScale's dict format
when one is available (:func:`dtune.fl.from_fedscale`).

``TraceKind.PREDICTABLE`` has the structure a client could learn from its own history:

- availability: a daily schedule of ``sessions`` on-windows (idle, charging, on Wi-Fi: the FLASH
  trace's notion of available) with a client-specific phase and length, plus rare unpredictable
  interruptions;
- compute speed: a lognormal per-device base times a sinusoidal usage cycle with client-specific
  period and phase, times an AR(1) perturbation;
- bandwidth: a Markov chain over cells (good, medium, poor) with mobility: each client walks a
  cyclic route of cells, staying a route-specific number of slots in each and sometimes taking a
  detour. The chain's state is (route position, time there), so the next cell is predictable.

``TraceKind.IID`` is the control: every client and slot draws speed, cell and availability
independently from one population distribution. No history (nor the current observation) says
anything about the next slot, so proactive and reactive selection should do no better than random.

Reference: Huang et al., "Prophet: Proactive Candidate-Selection for Federated Learning by
Predicting the Qualities of Training and Reporting Phases", arXiv 2002.00577 (mobility-driven
dynamics); Yang et al., "Characterizing Impacts of Heterogeneity in Federated Learning upon
Large-Scale Smartphone Data" (FLASH), WWW 2021 (availability).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from dtune.fl._traces import TraceSet

__all__ = ["TraceConfig", "TraceKind", "generate_traces"]


class TraceKind(enum.Enum):
    """Which dynamics a generated trace has."""

    PREDICTABLE = "predictable"
    IID = "iid"


def _check_range(name: str, value: tuple[float, float], low: float, high: float = np.inf) -> None:
    if len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise ValueError(
            f"The value of `{name}` is {value!r}, but must be (lo, hi) with {low} <= lo <= hi <= {high}."
        )


@dataclass(frozen=True, kw_only=True)
class TraceConfig:
    """How to generate traces. Times are in seconds, speeds in samples/s, bandwidth in Mbit/s.

    Example:
        >>> traces = generate_traces(TraceConfig(num_clients=20, duration_s=3600.0, history_s=1800.0), seed=0)
        >>> traces.speed.shape
        (20, 360)
    """

    num_clients: int = 100
    kind: TraceKind = TraceKind.PREDICTABLE
    step_s: float = 10.0
    history_s: float = 7200.0
    duration_s: float = 36000.0
    day_s: float = 3600.0
    # compute: base * usage cycle * AR(1)
    median_speed: float = 40.0
    speed_spread: float = 0.35
    cycle_amplitude: tuple[float, float] = (0.4, 1.0)
    cycle_period_s: tuple[float, float] = (120.0, 480.0)
    ar_coefficient: float = 0.9
    ar_noise: float = 0.08
    # bandwidth: Markov chain over cells along a route
    cell_mbps: tuple[float, ...] = (50.0, 12.0, 2.0)
    cell_probabilities: tuple[float, ...] = (0.35, 0.4, 0.25)
    route_length: tuple[int, int] = (3, 7)
    dwell_slots: tuple[int, int] = (1, 6)
    detour_probability: float = 0.05
    bandwidth_noise: float = 0.15
    # availability: daily schedule of sessions + interruptions
    sessions: int = 4
    on_fraction: tuple[float, float] = (0.45, 0.9)
    interruption_probability: float = 0.002
    interruption_slots: float = 3.0
    iid_availability: float = 0.97

    def __post_init__(self) -> None:
        if not isinstance(self.kind, TraceKind):
            raise TypeError(f"The value of `kind` is {self.kind!r}, but must be a dtune.fl.TraceKind.")
        for name in ("num_clients", "sessions"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"The value of `{name}` is {value!r}, but must be an integer >= 1.")
        for name in ("step_s", "day_s", "median_speed", "interruption_slots"):
            if not getattr(self, name) > 0:
                raise ValueError(f"The value of `{name}` is {getattr(self, name)!r}, but must be > 0.")
        if not 0 <= self.history_s < self.duration_s:
            raise ValueError(
                f"The value of `history_s` is {self.history_s!r}, "
                f"but must be in [0, duration_s={self.duration_s})."
            )
        if self.duration_s < 2 * self.step_s:
            raise ValueError(f"The value of `duration_s` is {self.duration_s!r}, but must be >= 2 * step_s.")
        if not 0 <= self.ar_coefficient < 1:
            raise ValueError(
                f"The value of `ar_coefficient` is {self.ar_coefficient!r}, but must be in [0, 1)."
            )
        for name in ("speed_spread", "ar_noise", "bandwidth_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"The value of `{name}` is {getattr(self, name)!r}, but must be >= 0.")
        for name in ("detour_probability", "interruption_probability", "iid_availability"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"The value of `{name}` is {getattr(self, name)!r}, but must be in [0, 1].")
        _check_range("cycle_amplitude", self.cycle_amplitude, 0.0)
        _check_range("cycle_period_s", self.cycle_period_s, 1e-9)
        _check_range("route_length", self.route_length, 1)
        _check_range("dwell_slots", self.dwell_slots, 1)
        _check_range("on_fraction", self.on_fraction, 0.0, 1.0)
        if len(self.cell_mbps) < 1 or min(self.cell_mbps) <= 0:
            raise ValueError(
                f"The value of `cell_mbps` is {self.cell_mbps!r}, but must be non-empty and > 0."
            )
        probabilities = np.asarray(self.cell_probabilities, dtype=float)
        if (
            len(probabilities) != len(self.cell_mbps)
            or probabilities.min() < 0
            or abs(probabilities.sum() - 1) > 1e-6
        ):
            raise ValueError(
                f"The value of `cell_probabilities` is {self.cell_probabilities!r}, but must be "
                f"{len(self.cell_mbps)} probabilities (one per cell) summing to 1."
            )


def generate_traces(config: TraceConfig, seed: int) -> TraceSet:
    """Generate a :class:`TraceSet` under ``config``; the same seed gives the same traces."""
    rng = np.random.default_rng(seed)
    slots = round(config.duration_s / config.step_s)
    times = np.arange(slots) * config.step_s
    if config.kind is TraceKind.IID:
        speed, bandwidth, available = _iid(config, rng, slots)
    else:
        speed = _speed(config, rng, times)
        bandwidth = _bandwidth(config, rng, slots)
        available = _availability(config, rng, times)
    return TraceSet(
        step_s=config.step_s, speed=speed, bandwidth=bandwidth, available=available,
        start_s=config.history_s, day_s=config.day_s,
    )  # fmt: skip


def _speed(config: TraceConfig, rng: np.random.Generator, times: np.ndarray) -> np.ndarray:
    n = config.num_clients
    base = np.log(config.median_speed) + config.speed_spread * rng.standard_normal(n)
    amplitude = rng.uniform(*config.cycle_amplitude, size=n)
    period = rng.uniform(*config.cycle_period_s, size=n)
    phase = rng.uniform(0, 2 * np.pi, size=n)
    cycle = amplitude[:, None] * np.sin(2 * np.pi * times[None, :] / period[:, None] + phase[:, None])
    ar = np.empty((n, len(times)))
    stationary = config.ar_noise / np.sqrt(1 - config.ar_coefficient**2)
    ar[:, 0] = stationary * rng.standard_normal(n)
    shocks = config.ar_noise * rng.standard_normal((n, len(times)))
    for t in range(1, len(times)):
        ar[:, t] = config.ar_coefficient * ar[:, t - 1] + shocks[:, t]
    return np.asarray(np.exp(base[:, None] + cycle + ar))


def _bandwidth(config: TraceConfig, rng: np.random.Generator, slots: int) -> np.ndarray:
    n = config.num_clients
    cells = len(config.cell_mbps)
    longest = config.route_length[1]
    length = rng.integers(config.route_length[0], config.route_length[1] + 1, size=n)
    route = rng.choice(cells, size=(n, longest), p=config.cell_probabilities)
    dwell = rng.integers(config.dwell_slots[0], config.dwell_slots[1] + 1, size=(n, longest))
    position = rng.integers(0, length)
    elapsed = rng.integers(0, dwell[np.arange(n), position])
    detour = np.full(n, -1)
    cell = np.empty((n, slots), dtype=np.int64)
    rows = np.arange(n)
    moves = rng.random((n, slots))
    detours = rng.integers(0, cells, size=(n, slots))
    for t in range(slots):
        here = np.where(detour >= 0, detour, route[rows, position])
        cell[:, t] = here
        elapsed += 1
        leave = elapsed >= dwell[rows, position]
        # a detour lasts as long as the route position it interrupted; afterwards the walk resumes
        take_detour = leave & (detour < 0) & (moves[:, t] < config.detour_probability)
        advance = leave & ~take_detour
        position = np.where(advance, (position + 1) % length, position)
        detour = np.where(take_detour, detours[:, t], np.where(advance, -1, detour))
        elapsed = np.where(leave, 0, elapsed)
    levels = np.asarray(config.cell_mbps, dtype=np.float64)
    noise = np.exp(config.bandwidth_noise * rng.standard_normal((n, slots)))
    return levels[cell] * noise


def _availability(config: TraceConfig, rng: np.random.Generator, times: np.ndarray) -> np.ndarray:
    n = config.num_clients
    phase = rng.random(n)
    on = rng.uniform(*config.on_fraction, size=n)
    session_position = (times[None, :] * config.sessions / config.day_s - phase[:, None]) % 1.0
    available = session_position < on[:, None]
    if config.interruption_probability > 0:
        starts = rng.random((n, len(times))) < config.interruption_probability
        lengths = rng.geometric(1.0 / config.interruption_slots, size=(n, len(times)))
        remaining = np.zeros(n, dtype=np.int64)
        for t in range(len(times)):
            remaining = np.where(starts[:, t] & (remaining == 0), lengths[:, t], remaining)
            available[:, t] &= remaining == 0
            remaining = np.maximum(remaining - 1, 0)
    return available


def _iid(
    config: TraceConfig, rng: np.random.Generator, slots: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Same scale of values as the predictable kind, but independent across clients and slots."""
    n = config.num_clients
    amplitude = float(np.mean(config.cycle_amplitude))
    spread = np.sqrt(
        config.speed_spread**2 + amplitude**2 / 2 + config.ar_noise**2 / (1 - config.ar_coefficient**2)
    )
    speed = np.exp(np.log(config.median_speed) + spread * rng.standard_normal((n, slots)))
    cell = rng.choice(len(config.cell_mbps), size=(n, slots), p=config.cell_probabilities)
    levels = np.asarray(config.cell_mbps, dtype=np.float64)
    bandwidth = levels[cell] * np.exp(config.bandwidth_noise * rng.standard_normal((n, slots)))
    available = rng.random((n, slots)) < config.iid_availability
    return speed, bandwidth, available
