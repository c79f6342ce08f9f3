"""Moving payloads: asynchronous all-reduce and all-gather over a process group, with accounting.

Built on ``torch.distributed`` directly because DDP hooks need asynchronous collectives and
futures, which ``dtune.runtime.distributed`` (synchronous, world group) does not offer; rank
and world size still come from there, so one process without a group works (the collectives
become identities). Every collective is *issued* on the calling thread in program order, never
from a future's callback: gloo matches collectives by issue order, and a callback issuing one
would race the next bucket's hook on another rank.
"""

from __future__ import annotations

from typing import Any

import torch

from dtune.comm._base import BucketState
from dtune.comm._stats import Accounting
from dtune.runtime import distributed

__all__ = ["Communicator"]


def _done(value: Any) -> torch.futures.Future[Any]:
    fut: torch.futures.Future[Any] = torch.futures.Future()
    fut.set_result(value)
    return fut


def _work(work: Any) -> Any:
    if work is None:  # only for async_op=False, which is never used here
        raise RuntimeError("torch.distributed returned no Work handle for an asynchronous collective.")
    return work


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class Communicator:
    """Collectives of one process group (``None``: the default group), counted in ``accounting``."""

    __slots__ = ("accounting", "group")

    def __init__(self, group: Any = None, accounting: Accounting | None = None) -> None:
        self.group = group
        self.accounting = accounting if accounting is not None else Accounting()

    @property
    def world_size(self) -> int:
        if self.group is not None:
            return int(self.group.size())
        return distributed.world_size()

    @property
    def rank(self) -> int:
        if self.group is not None:
            return int(self.group.rank())
        return distributed.rank()

    def all_reduce(self, tensor: torch.Tensor, bucket: BucketState) -> torch.futures.Future[torch.Tensor]:
        """Sum ``tensor`` over ranks in place; the future holds ``tensor``."""
        self.accounting.add(bucket=bucket.index, sent=_nbytes(tensor), collectives=1)
        if self.world_size == 1:
            return _done(tensor)
        import torch.distributed as dist

        work = dist.all_reduce(tensor, group=self.group, async_op=True)
        future: torch.futures.Future[torch.Tensor] = _work(work).get_future().then(lambda fut: tensor)
        return future

    def all_gather(
        self, tensor: torch.Tensor, bucket: BucketState, *, variable: bool = False
    ) -> torch.futures.Future[list[torch.Tensor]]:
        """Every rank's ``tensor`` in rank order; with ``variable`` the lengths may differ.

        Variable lengths cost one small gather of the lengths (on this thread, waited for) and
        then one gather of tensors padded to the longest, both counted.
        """
        size = self.world_size
        if size == 1:
            self.accounting.add(bucket=bucket.index, sent=_nbytes(tensor), collectives=1)
            return _done([tensor])
        import torch.distributed as dist

        lengths = [tensor.numel()] * size
        if variable:
            mine = torch.tensor([tensor.numel()], dtype=torch.int64)
            everyone = [torch.empty_like(mine) for _ in range(size)]
            self.accounting.add(bucket=bucket.index, sent=_nbytes(mine), collectives=1)
            dist.all_gather(everyone, mine, group=self.group)
            lengths = [int(n.item()) for n in everyone]
            longest = max(lengths)
            if tensor.numel() < longest:
                padded = tensor.new_zeros(longest)
                padded[: tensor.numel()] = tensor
                tensor = padded
        outputs = [torch.empty_like(tensor) for _ in range(size)]
        self.accounting.add(bucket=bucket.index, sent=_nbytes(tensor), collectives=1)
        work = dist.all_gather(outputs, tensor, group=self.group, async_op=True)

        # gloo's future holds the flat output list; read the list we allocated instead
        def trimmed(fut: Any) -> list[torch.Tensor]:
            return [out[:n] for out, n in zip(outputs, lengths, strict=True)]

        future: torch.futures.Future[list[torch.Tensor]] = _work(work).get_future().then(trimmed)
        return future
