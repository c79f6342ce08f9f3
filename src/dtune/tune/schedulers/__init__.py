"""Trial schedulers: decide, per result, whether a trial continues, pauses or stops."""

from dtune.tune.schedulers._base import Decision, Scheduler, TrialSuggestion
from dtune.tune.schedulers._fifo import FIFO

__all__ = ["FIFO", "Decision", "Scheduler", "TrialSuggestion"]
