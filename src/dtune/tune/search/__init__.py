"""Searchers: propose configs for new trials and learn from their results."""

from dtune.tune.search._base import Searcher
from dtune.tune.search._grid import Grid
from dtune.tune.search._random import Random

__all__ = ["Grid", "Random", "Searcher"]
