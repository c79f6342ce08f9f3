"""Runtime: processes that run work (a warm local pool), knowing nothing of trials or gradients."""

from dtune.runtime.pool import Event, EventKind, WorkerHandle, WorkerPool

__all__ = ["Event", "EventKind", "WorkerHandle", "WorkerPool"]
