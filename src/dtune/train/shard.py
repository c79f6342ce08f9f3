"""``train.shard``: each rank takes its own share of every epoch."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from dtune.runtime import distributed

__all__ = ["shard"]

T = TypeVar("T")


def shard(batches: Iterable[T]) -> Iterator[T]:
    """Yield every ``world_size``-th batch, starting at this rank's index.

    Batches are taken in rounds of ``world_size``; an incomplete last round is dropped so that
    every rank takes the same number of steps (a rank with one more step would wait forever in
    its all-reduce). Every rank iterates the whole source, which is cheap for in-memory tensors;
    for expensive loading give the DataLoader a ``DistributedSampler`` instead.

    Example:
        >>> list(shard(range(5)))  # one worker: everything
        [0, 1, 2, 3, 4]
    """
    size, rank = distributed.world_size(), distributed.rank()
    if size == 1:
        yield from batches
        return
    round_: list[T] = []
    for batch in batches:
        round_.append(batch)
        if len(round_) == size:
            yield round_[rank]
            round_ = []
