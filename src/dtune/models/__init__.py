"""Small models for tests and benchmarks that train in seconds on two cores.

- :class:`DLRM`: a click-through-rate model with embedding bags and dot interaction.
"""

from dtune.models._dlrm import DLRM

__all__ = ["DLRM"]
