"""What a simulated round records, and the summary of a run: the numbers selection and aggregation
are judged by."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["RoundResult", "RunSummary", "summarize"]


@dataclass(frozen=True)
class RoundResult:
    """One round: timing on the virtual clock, who took part and how, the model afterwards."""

    round: int
    start_s: float
    latency_s: float
    num_candidates: int
    selected: np.ndarray
    valid: np.ndarray
    dropped: np.ndarray
    duration_s: np.ndarray
    aggregated: bool
    accuracy: float
    loss: float
    num_attackers: int
    liars_selected: int
    newly_excluded: np.ndarray
    wall_s: float

    @property
    def end_s(self) -> float:
        return self.start_s + self.latency_s

    @property
    def num_valid(self) -> int:
        return int(self.valid.sum())


@dataclass(frozen=True)
class RunSummary:
    """Aggregate metrics of a run (virtual times in seconds since training began).

    ``valid_ratio``: valid participants over selected ones (Prophet's metric); ``dropout_rate``:
    selected clients that went offline before finishing; ``straggler_rate``: selected clients that
    stayed but missed the deadline; ``time_to_target_s``: virtual time until the test accuracy,
    averaged over the last ``smooth`` rounds, first reached the target (``inf`` if never; the
    average keeps one lucky round from deciding it); ``final_accuracy``: mean over the last
    ``final_window`` rounds.
    """

    rounds: int
    valid_ratio: float
    dropout_rate: float
    straggler_rate: float
    mean_latency_s: float
    virtual_time_s: float
    time_to_target_s: float
    final_accuracy: float
    wall_s: float

    def as_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(self).items()}


def summarize(
    history: Sequence[RoundResult], target_accuracy: float, *, smooth: int = 5, final_window: int = 10
) -> RunSummary:
    """Summarise ``history`` (a simulator's rounds, in order)."""
    if not history:
        raise ValueError("The history is empty: play at least one round before summarising.")
    selected = sum(len(r.selected) for r in history)
    valid = sum(r.num_valid for r in history)
    dropped = sum(int(r.dropped.sum()) for r in history)
    start = history[0].start_s
    accuracy = np.array([r.accuracy for r in history])
    trailing = np.array([accuracy[max(0, i - smooth + 1) : i + 1].mean() for i in range(len(history))])
    hit = np.flatnonzero(trailing >= target_accuracy)
    reached = history[int(hit[0])].end_s - start if len(hit) else math.inf
    return RunSummary(
        rounds=len(history),
        valid_ratio=valid / max(selected, 1),
        dropout_rate=dropped / max(selected, 1),
        straggler_rate=(selected - valid - dropped) / max(selected, 1),
        mean_latency_s=float(np.mean([r.latency_s for r in history])),
        virtual_time_s=history[-1].end_s - start,
        time_to_target_s=reached,
        final_accuracy=float(accuracy[-final_window:].mean()),
        wall_s=float(sum(r.wall_s for r in history)),
    )
