"""``train.launch``: run a training function on N local workers, without any search."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dtune.runtime import GroupTask, WorkerGroup, WorkerPool

__all__ = ["LaunchResult", "WorkerGroupError", "launch"]

_KEY = "loop"


class WorkerGroupError(RuntimeError):
    """A worker of the group failed; the message names its rank and carries its traceback."""


@dataclass(frozen=True)
class LaunchResult:
    """What rank 0 reported with ``dtune.report`` and what it returned."""

    results: list[dict[str, Any]]
    value: Any


@dataclass(frozen=True)
class _Loop:
    loop: Callable[[dict[str, Any]], Any]

    def __call__(self, channel: Any, config: dict[str, Any]) -> Any:
        return self.loop(config)


def launch(
    loop: Callable[[dict[str, Any]], Any],
    *,
    workers: int = 2,
    config: dict[str, Any] | None = None,
    collective_timeout_s: float = 300.0,
    threads_per_worker: int = 1,
) -> LaunchResult:
    """Run ``loop(config)`` on ``workers`` processes forming one process group.

    The same loop runs under ``dtune.run(..., resources=Resources(workers=N))`` as one trial.
    If a worker raises or dies, the others are stopped at once and :class:`WorkerGroupError`
    names the rank; a collective stuck for ``collective_timeout_s`` fails the same way.

    Example:
        >>> result = launch(my_loop, workers=2, config={"lr": 0.1})  # doctest: +SKIP
        >>> result.results[-1]["loss"]  # doctest: +SKIP
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"The value of `workers` is {workers!r}, but must be an integer >= 1.")
    threads = str(threads_per_worker)
    pool = WorkerPool(workers, env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
    try:
        pool.register(
            _KEY, GroupTask(_Loop(loop)), what=f"The training function {getattr(loop, '__name__', loop)!r}"
        )
        group = WorkerGroup("launch", pool.idle(), timeout_s=collective_timeout_s)
        group.start(pool, _KEY, (dict(config or {}),))
        results: list[dict[str, Any]] = []
        finished = False
        while not finished:
            for event in pool.wait(1.0):
                if event.task_id is None:
                    continue
                results.extend(event.items)
                finished = group.handle(pool, event) or finished
        if group.failure is not None:
            raise WorkerGroupError(group.failure[1])
        return LaunchResult(results, group.value(0))
    finally:
        pool.shutdown(timeout=5.0)
