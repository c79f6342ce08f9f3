"""Searchers: propose configs for new trials and learn from their results.

One algorithm per private module, all behind the small :class:`Searcher` contract; every
searcher takes ``points_to_evaluate`` (configs to try first).
"""

from dtune.tune.search._base import Searcher
from dtune.tune.search._bohb import BOHB
from dtune.tune.search._grid import Grid
from dtune.tune.search._limiter import ConcurrencyLimiter
from dtune.tune.search._optuna import Optuna
from dtune.tune.search._random import Random

__all__ = ["BOHB", "ConcurrencyLimiter", "Grid", "Optuna", "Random", "Searcher"]
