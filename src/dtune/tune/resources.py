"""What one trial occupies, and how many trials fit on this machine at once."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

__all__ = ["Resources", "available_cpus"]


def available_cpus() -> int:
    """CPUs this process may run on (respects affinity masks and container CPU sets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True, kw_only=True)
class Resources:
    """Resources of one trial.

    ``cpus`` is per worker and may be fractional: ``Resources(cpus=0.5)`` runs two trials per
    CPU, which is how you ask for more concurrent trials than CPUs (e.g. trials that mostly
    wait). ``workers=N`` makes each trial a group of N processes joined in a
    ``torch.distributed`` process group (gloo; see ``dtune.train``), counted as N x ``cpus``.
    A collective that does not complete within ``collective_timeout_s`` fails the trial
    instead of hanging it.

    Example:
        >>> Resources(cpus=1, workers=2).slots(total_cpus=4)
        2
    """

    cpus: float = 1.0
    workers: int = 1
    collective_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if not isinstance(self.cpus, (int, float)) or not self.cpus > 0:
            raise ValueError(f"The value of `cpus` is {self.cpus!r}, but must be > 0.")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"The value of `workers` is {self.workers!r}, but must be an integer >= 1.")
        if not self.collective_timeout_s > 0:
            raise ValueError(
                f"The value of `collective_timeout_s` is {self.collective_timeout_s!r}, but must be > 0."
            )

    def slots(self, total_cpus: int | None = None) -> int:
        """How many such trials fit on ``total_cpus`` (this machine's by default); at least 1."""
        total = available_cpus() if total_cpus is None else total_cpus
        return max(1, math.floor(total / (self.cpus * self.workers) + 1e-9))

    def worker_env(self) -> dict[str, str]:
        """Environment for worker processes so that math libraries use the trial's CPUs only."""
        threads = str(max(1, math.floor(self.cpus)))
        return {k: os.environ.get(k, threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
