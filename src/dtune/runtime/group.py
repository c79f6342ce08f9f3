"""Worker groups: one task run by N pool workers that form a ``torch.distributed`` group.

The driver side (:class:`WorkerGroup`) starts the N ranks on idle workers with a fresh
rendezvous port, and treats the group as one unit: it ends when every rank has ended, and the
first rank to fail (raise, die, or time out in a collective) takes the others down with it, so
the group stops within seconds and the error names the rank. The worker side
(:class:`GroupTask`) joins the process group around the user's function and leaves it after,
so warm workers can join the next group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from dtune.runtime import distributed
from dtune.runtime.distributed import GroupSpec
from dtune.runtime.pool import Event, EventKind, WorkerHandle, WorkerPool

__all__ = ["GroupTask", "WorkerGroup"]


@dataclass(frozen=True)
class GroupTask:
    """Runs ``fn(channel, *args)`` inside the process group of ``spec`` (none for one worker)."""

    fn: Callable[..., Any]

    def __call__(self, channel: Any, spec: GroupSpec, *args: Any) -> Any:
        if spec.world_size == 1:
            return self.fn(channel, *args)
        distributed.init_group(spec)
        try:
            return self.fn(channel, *args)
        except RuntimeError as exc:
            if "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
                raise TimeoutError(
                    f"rank {spec.rank}: a collective did not complete within {spec.timeout_s:g} s "
                    "(collective_timeout_s); another rank probably hung or stopped calling collectives."
                ) from exc
            raise
        finally:
            distributed.destroy_group()


class WorkerGroup:
    """The ranks of one group task on a pool, tracked as a unit (driver side)."""

    def __init__(
        self, name: Any, workers: list[WorkerHandle], *, timeout_s: float = 300.0, backend: str = "gloo"
    ):
        self.name = name
        self.workers = workers
        self.timeout_s = timeout_s
        self.backend = backend
        self.ended: dict[int, Event] = {}
        self.failure: tuple[int, str] | None = None

    @property
    def size(self) -> int:
        return len(self.workers)

    def task_id(self, rank: int) -> tuple[Any, int]:
        return (self.name, rank)

    def start(self, pool: WorkerPool, key: str, args: tuple[Any, ...]) -> None:
        """Submit rank r of the task to ``workers[r]``, all meeting at a fresh loopback port."""
        addr = distributed.rendezvous_address()
        spec = GroupSpec(
            rank=0,
            world_size=self.size,
            addr=addr,
            port=distributed.free_port(addr) if self.size > 1 else 0,
            backend=self.backend,
            timeout_s=self.timeout_s,
        )
        for rank, worker in enumerate(self.workers):
            pool.submit(worker, self.task_id(rank), key, (replace(spec, rank=rank, local_rank=rank), *args))

    def handle(self, pool: WorkerPool, event: Event) -> bool:
        """Account for a rank's final event; True once every rank has ended."""
        _, rank = event.task_id
        if event.kind is EventKind.ITEMS:
            return False
        self.ended[rank] = event
        if event.kind in (EventKind.ERROR, EventKind.DIED) and self.failure is None:
            prefix = f"rank {rank} of {self.size}: " if self.size > 1 else ""
            self.failure = (rank, prefix + str(event.value))
            for other, worker in enumerate(self.workers):
                if other not in self.ended:
                    pool.kill(worker)  # peers would otherwise wait in a collective until timeout
        return len(self.ended) == self.size

    def value(self, rank: int = 0) -> Any:
        return self.ended[rank].value

    def control(self, pool: WorkerPool, value: Any) -> None:
        """Send ``value`` to rank 0, which shares it with the other ranks at their next report."""
        pool.control(self.workers[0], value)
