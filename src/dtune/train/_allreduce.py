"""Synchronous data parallelism: gradients averaged across workers at every step.

Built on PyTorch's ``DistributedDataParallel``: gradients are reduced in buckets of
``bucket_mb`` while the backward pass is still running, which is what makes all-reduce cheap
to overlap; a compressor plugs in as a DDP communication hook.
"""

from __future__ import annotations

from typing import Any, Protocol

from dtune.runtime import distributed
from dtune.train.strategy import Strategy

__all__ = ["AllReduce", "CommHookProvider"]


class CommHookProvider(Protocol):
    """Anything that can hand DDP a communication hook (dtune's compressors do)."""

    def ddp_hook(self) -> tuple[Any, Any]: ...


class AllReduce(Strategy):
    """Average gradients over all workers every step, overlapped with backward.

    Example:
        >>> from dtune import train
        >>> strategy = train.AllReduce(bucket_mb=25)
        >>> # model, optimizer = train.prepare(model, optimizer, strategy=strategy)
    """

    def __init__(self, bucket_mb: float = 25.0, compression: CommHookProvider | None = None) -> None:
        if not bucket_mb > 0:
            raise ValueError(f"The value of `bucket_mb` is {bucket_mb!r}, but must be > 0.")
        if compression is not None and not callable(getattr(compression, "ddp_hook", None)):
            raise TypeError(
                f"`compression` must provide ddp_hook() -> (state, hook), got {type(compression).__name__}."
            )
        self.bucket_mb = bucket_mb
        self.compression = compression
        self.hook_state: Any = None

    def wrap(self, model: Any, optimizer: Any) -> tuple[Any, Any]:
        if distributed.world_size() == 1:
            return model, optimizer
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, bucket_cap_mb=self.bucket_mb)
        if self.compression is not None:
            self.hook_state, hook = self.compression.ddp_hook()
            ddp.register_comm_hook(self.hook_state, hook)
        return ddp, optimizer

    def state_dict(self) -> dict[str, Any]:
        state = getattr(self.hook_state, "state_dict", None)
        return {"hook": state()} if callable(state) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load = getattr(self.hook_state, "load_state_dict", None)
        if "hook" in state and callable(load):
            load(state["hook"])
