"""FedScale's trace format, so that published device and behaviour traces can be dropped in.

FedScale ships two pickled dicts (in its Git repository, ``benchmark/dataset/data/device_info``;
they are not in the wheel and cannot be downloaded here):

- ``client_device_capacity``: ``{client_id: {"computation": ms per sample, "communication":
  kbit/s}}`` (AI Benchmark and MobiPerf measurements). FedScale's training time is
  ``3 * batch * steps * computation / 1000`` s (a backward pass costs about twice the forward
  one), so the traced speed is ``1000 / (3 * computation)`` samples/s; bandwidth is
  ``communication / 1000`` Mbit/s. Both are static per client in this format.
- ``client_behave_trace``: ``{client_id: {"active": [s, ...], "inactive": [s, ...],
  "finish_time": s, ...}}`` (the FLASH trace): the client is available while ``t % finish_time``
  lies in some ``[active[k], inactive[k]]``.

A slot counts as available only if the client is available for the whole slot, so choose
``step_s`` small against the windows (the loss of precision is at most one slot per edge).

Reference: Lai et al., "FedScale: Benchmarking Model and System Performance of Federated
Learning at Scale", ICML 2022; Yang et al., "Characterizing Impacts of Heterogeneity in Federated
Learning upon Large-Scale Smartphone Data", WWW 2021 (FLASH).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dtune.fl._traces import TraceSet

__all__ = ["from_fedscale", "load_fedscale", "to_fedscale"]

FEDSCALE_AUGMENTATION = 3.0  # FedScale's forward+backward cost factor on the per-sample latency


def _windows_available(window: Mapping[str, Any], starts: np.ndarray, step_s: float) -> np.ndarray:
    finish = float(window["finish_time"])
    active, inactive = np.asarray(window["active"], float), np.asarray(window["inactive"], float)
    if finish <= 0 or len(active) != len(inactive):
        raise ValueError(
            f"A behaviour trace needs finish_time > 0 and as many active as inactive times, got "
            f"finish_time={finish}, {len(active)} active, {len(inactive)} inactive."
        )
    begin = starts % finish
    end = begin + step_s
    inside = (active[None, :] <= begin[:, None] + 1e-9) & (end[:, None] <= inactive[None, :] + 1e-9)
    return np.asarray(inside.any(axis=1))


def from_fedscale(
    device_capacity: Mapping[Any, Mapping[str, float]],
    behaviour: Mapping[Any, Mapping[str, Any]] | None = None,
    *,
    clients: Sequence[Any] | None = None,
    step_s: float = 10.0,
    duration_s: float | None = None,
    start_s: float = 0.0,
    day_s: float = 86400.0,
) -> tuple[TraceSet, list[Any]]:
    """Build a :class:`TraceSet` from FedScale's dicts; returns it with the client ids in row order.

    ``clients`` picks and orders the clients (default: the capacity's keys, sorted, restricted to
    those in ``behaviour`` if given). Without ``behaviour`` every client is always available.
    ``duration_s`` defaults to the longest ``finish_time``.

    Example:
        >>> traces, ids = from_fedscale({1: {"computation": 25.0, "communication": 8000.0}},
        ...     {1: {"active": [0.0], "inactive": [30.0], "finish_time": 60.0}}, step_s=10.0)
        >>> traces.speed[0, 0], traces.bandwidth[0, 0], traces.available[0].tolist()
        (np.float64(13.333333333333334), np.float64(8.0), [True, True, True, False, False, False])
    """
    if clients is None:
        keys = [k for k in device_capacity if behaviour is None or k in behaviour]
        clients = sorted(keys, key=lambda k: (str(type(k)), k))
    ids = list(clients)
    if not ids:
        raise ValueError("No client is in both `device_capacity` and `behaviour`.")
    missing = [c for c in ids if c not in device_capacity or (behaviour is not None and c not in behaviour)]
    if missing:
        raise ValueError(f"Clients {missing[:5]!r} have no device capacity or behaviour trace.")
    if duration_s is None:
        if behaviour is None:
            raise ValueError("Without a behaviour trace, give `duration_s` (the trace length).")
        duration_s = max(float(behaviour[c]["finish_time"]) for c in ids)
    slots = max(1, int(np.ceil(duration_s / step_s)))
    computation = np.array([float(device_capacity[c]["computation"]) for c in ids])
    communication = np.array([float(device_capacity[c]["communication"]) for c in ids])
    if np.any(computation <= 0) or np.any(communication <= 0):
        raise ValueError(
            "Device capacities must have computation > 0 (ms/sample) and communication > 0 (kbit/s)."
        )
    speed = np.repeat((1000.0 / (FEDSCALE_AUGMENTATION * computation))[:, None], slots, axis=1)
    bandwidth = np.repeat((communication / 1000.0)[:, None], slots, axis=1)
    starts = np.arange(slots) * step_s
    if behaviour is None:
        available = np.ones((len(ids), slots), bool)
    else:
        available = np.stack([_windows_available(behaviour[c], starts, step_s) for c in ids])
    traces = TraceSet(
        step_s=step_s, speed=speed, bandwidth=bandwidth, available=available, start_s=start_s, day_s=day_s
    )
    return traces, ids


def to_fedscale(traces: TraceSet) -> tuple[dict[int, dict[str, float]], dict[int, dict[str, Any]]]:
    """FedScale's two dicts for ``traces`` (client ids 1..N, as FedScale numbers them).

    The capacity format is static, so speed and bandwidth become each client's mean: the dynamics
    a proactive selector exploits do not survive the conversion; availability does, exactly.
    """
    capacity: dict[int, dict[str, float]] = {}
    behaviour: dict[int, dict[str, Any]] = {}
    for row in range(traces.num_clients):
        flags = traces.available[row].astype(np.int8)
        edges = np.diff(np.concatenate([[0], flags, [0]]))
        ons, offs = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        capacity[row + 1] = {
            "computation": 1000.0 / (FEDSCALE_AUGMENTATION * float(traces.speed[row].mean())),
            "communication": 1000.0 * float(traces.bandwidth[row].mean()),
        }
        behaviour[row + 1] = {
            "active": (ons * traces.step_s).tolist(), "inactive": (offs * traces.step_s).tolist(),
            "finish_time": traces.duration_s, "duration": traces.duration_s, "model": "dtune-generated",
        }  # fmt: skip
    return capacity, behaviour


def load_fedscale(
    device_capacity_path: str | Path, behaviour_path: str | Path | None = None, **kwargs: Any
) -> tuple[TraceSet, list[Any]]:
    """Load FedScale's pickled ``client_device_capacity`` (and ``client_behave_trace``) files and
    convert them with :func:`from_fedscale`. Unpickling runs code: load only files you trust."""
    with open(device_capacity_path, "rb") as fh:
        capacity = pickle.load(fh)
    behaviour = None
    if behaviour_path is not None:
        with open(behaviour_path, "rb") as fh:
            behaviour = pickle.load(fh)
    return from_fedscale(capacity, behaviour, **kwargs)
