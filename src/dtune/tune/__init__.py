"""Model selection: search spaces, searchers, schedulers, the trial runner and its store.

This layer never imports torch at import time: a trial's gradients are not its business.
"""

from dtune.tune import schedulers, search
from dtune.tune.api import resume, run
from dtune.tune.checkpoint import Checkpoint
from dtune.tune.resources import Resources
from dtune.tune.results import Results, TrialResult
from dtune.tune.session import TrialContext, get_checkpoint, get_context, report
from dtune.tune.spaces import choice, grid, loguniform, quniform, randint, sample_from, uniform
from dtune.tune.trainable import Trainable
from dtune.tune.trial import Trial, TrialStatus

__all__ = [
    "Checkpoint",
    "Resources",
    "Results",
    "Trainable",
    "Trial",
    "TrialContext",
    "TrialResult",
    "TrialStatus",
    "choice",
    "get_checkpoint",
    "get_context",
    "grid",
    "loguniform",
    "quniform",
    "randint",
    "report",
    "resume",
    "run",
    "sample_from",
    "schedulers",
    "search",
    "uniform",
]
