"""Runtime: processes that run work (a warm local pool, worker groups), knowing nothing of trials.

Nothing here imports torch at import time; ``distributed`` imports it when a group forms.
"""

from dtune.runtime._channel import GO, current_channel
from dtune.runtime.distributed import GroupSpec
from dtune.runtime.group import GroupTask, WorkerGroup
from dtune.runtime.pool import Event, EventKind, WorkerHandle, WorkerPool

__all__ = [
    "GO",
    "Event",
    "EventKind",
    "GroupSpec",
    "GroupTask",
    "WorkerGroup",
    "WorkerHandle",
    "WorkerPool",
    "current_channel",
]
