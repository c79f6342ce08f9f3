"""Which worker decomposes which layer, and who preconditions it (SC20 / KAISA layout).

The ``world`` workers form a grid of ``grad_workers`` rows by ``world / grad_workers`` columns:
rank ``r`` sits in row ``r // columns`` and column ``r % columns``. A layer belongs to one
column, whose members are its *gradient workers*: they hold its decomposition and precondition
its gradient. One of them, the *inverse worker*, computes the decomposition and broadcasts it
along the column. Every row holds one gradient worker of each layer, which broadcasts the
preconditioned gradient along its row. ``grad_workers == world`` is COMM-OPT (one column,
nothing sent per step), ``grad_workers == 1`` is MEM-OPT (one row, nothing sent at inverse
updates), anything between is HYBRID.

Layers are placed by greedy longest-processing-time scheduling on an ``n^3`` cost model: the
most expensive layer first, each to the least-loaded column and, inside it, the least-loaded
worker. LPT's makespan is within 4/3 of the optimum (Graham, 1969).

Example:
    >>> from dtune.optim import plan_work
    >>> plan = plan_work([100, 60, 50, 40], world_size=2, grad_workers=2)
    >>> plan.inverse_workers, plan.loads
    ((0, 1, 1, 0), (140.0, 110.0))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dtune.optim._config import Assignment, check_value

__all__ = ["WorkPlan", "grad_workers_for", "plan_work"]


def grad_workers_for(assignment: Assignment, fraction: float, world_size: int) -> int:
    """How many gradient workers each layer gets: a divisor of ``world_size``.

    HYBRID rounds ``fraction * world_size`` to the nearest divisor of the world size that is
    not larger (KAISA's grid needs equal rows), and at least 1.
    """
    if assignment is Assignment.COMM_OPT:
        return world_size
    if assignment is Assignment.MEM_OPT:
        return 1
    check_value("grad_worker_fraction", fraction)
    wanted = max(1, round(fraction * world_size))
    return max(d for d in range(1, wanted + 1) if world_size % d == 0)


@dataclass(frozen=True)
class WorkPlan:
    """The placement of every layer (by index) on a grid of workers."""

    world_size: int
    grad_workers: int
    columns_of_layers: tuple[int, ...]
    inverse_workers: tuple[int, ...]
    loads: tuple[float, ...]
    """Total decomposition cost per worker."""

    @property
    def columns(self) -> int:
        return self.world_size // self.grad_workers

    def column_ranks(self, column: int) -> tuple[int, ...]:
        """The gradient workers of the layers in ``column``."""
        return tuple(range(column, self.world_size, self.columns))

    def row_ranks(self, row: int) -> tuple[int, ...]:
        """The workers that share preconditioned gradients with each other."""
        return tuple(range(row * self.columns, (row + 1) * self.columns))

    def column_of(self, rank: int) -> int:
        return rank % self.columns

    def row_of(self, rank: int) -> int:
        return rank // self.columns

    def is_grad_worker(self, layer: int, rank: int) -> bool:
        return self.columns_of_layers[layer] == self.column_of(rank)

    def grad_source(self, layer: int, rank: int) -> int:
        """The gradient worker of ``layer`` in ``rank``'s row (``rank`` itself if it is one)."""
        return self.row_of(rank) * self.columns + self.columns_of_layers[layer]


def plan_work(costs: Sequence[float], *, world_size: int, grad_workers: int) -> WorkPlan:
    """Greedy LPT placement of layers with decomposition ``costs`` on the worker grid."""
    if world_size < 1 or grad_workers < 1 or world_size % grad_workers:
        raise ValueError(
            f"The value of `grad_workers` is {grad_workers!r}, but must divide the world size {world_size}."
        )
    columns = world_size // grad_workers
    column_load = [0.0] * columns
    rank_load = [0.0] * world_size
    column_of = [0] * len(costs)
    worker_of = [0] * len(costs)
    for layer in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        column = min(range(columns), key=lambda c: (column_load[c], c))
        worker = min(range(column, world_size, columns), key=lambda r: (rank_load[r], r))
        column_load[column] += costs[layer]
        rank_load[worker] += costs[layer]
        column_of[layer], worker_of[layer] = column, worker
    return WorkPlan(world_size, grad_workers, tuple(column_of), tuple(worker_of), tuple(rank_load))
