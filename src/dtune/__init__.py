"""dtune: distributed model selection and training on PyTorch.

A training function meets dtune through two doors: :func:`dtune.report` (to the search) and,
for data-parallel training, ``dtune.train.prepare``. See the README for a tour.
"""

from dtune.tune import (
    Checkpoint,
    Resources,
    Results,
    Trainable,
    TrialContext,
    TrialResult,
    choice,
    get_checkpoint,
    get_context,
    grid,
    loguniform,
    quniform,
    randint,
    report,
    resume,
    run,
    sample_from,
    schedulers,
    search,
    uniform,
)

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "Resources",
    "Results",
    "Trainable",
    "TrialContext",
    "TrialResult",
    "__version__",
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
