"""Trial schedulers: decide, per result, whether a trial continues, pauses or stops.

One algorithm per private module (``_asha.py``, ``_hyperband.py`` ...), all behind the small
:class:`Scheduler` contract; decisions are the :class:`Decision` enum.
"""

from dtune.tune.schedulers._asha import ASHA
from dtune.tune.schedulers._base import Decision, Scheduler, TrialSuggestion
from dtune.tune.schedulers._fifo import FIFO
from dtune.tune.schedulers._hyperband import HyperBand
from dtune.tune.schedulers._median import MedianStopping
from dtune.tune.schedulers._pbt import PBT

__all__ = ["ASHA", "FIFO", "PBT", "Decision", "HyperBand", "MedianStopping", "Scheduler", "TrialSuggestion"]
