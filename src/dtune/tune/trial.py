"""The driver's record of one trial: what it runs, where it stands, what it reported last."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Trial", "TrialStatus"]


class TrialStatus(enum.StrEnum):
    """Life cycle: PENDING -> RUNNING -> (PAUSED -> RUNNING)* -> TERMINATED | ERROR."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    TERMINATED = "TERMINATED"
    ERROR = "ERROR"

    @property
    def is_finished(self) -> bool:
        return self in (TrialStatus.TERMINATED, TrialStatus.ERROR)


@dataclass(eq=False)
class Trial:
    """One configuration under evaluation.

    Schedulers and searchers receive trials read-only: they decide, the runner mutates.
    ``checkpoint`` is the path of the newest checkpoint that the store has made durable, and
    ``checkpoint_iteration`` the ``training_iteration`` it was reported with.
    """

    trial_id: str
    config: dict[str, Any]
    status: TrialStatus = TrialStatus.PENDING
    last_result: dict[str, Any] | None = None
    num_results: int = 0
    checkpoint: str | None = None
    checkpoint_iteration: int = 0
    num_failures: int = 0
    error: str | None = None
    stop_requested: bool = False
    pause_requested: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def iteration(self) -> int:
        """The ``training_iteration`` of the last result, 0 before the first."""
        if self.last_result is None:
            return 0
        return int(self.last_result.get("training_iteration", 0))
