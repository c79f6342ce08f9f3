"""First in, first out: every trial runs to its end in the order it was created."""

from __future__ import annotations

from dtune.tune.schedulers._base import Scheduler

__all__ = ["FIFO"]


class FIFO(Scheduler):
    """Runs trials in creation order and never stops one early.

    Example:
        >>> import dtune
        >>> scheduler = dtune.schedulers.FIFO()
    """
