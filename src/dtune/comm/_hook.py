"""The DDP communication hook adapter and the state every compressor runs with.

``ddp_hook(compressor)`` returns ``(state, hook)`` for ``DistributedDataParallel.register_comm_hook``
(PyTorch's hook shape ``(state, bucket) -> Future[Tensor]``, as in ``powerSGD_hook``). The same
state also reduces plain lists of tensors (:meth:`CommState.all_reduce`), which is how a
strategy without DDP, or a single process, uses a compressor.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed

from dtune.comm._base import BucketState, Compressor
from dtune.comm._communicator import Communicator
from dtune.comm._memory import Memory, NoMemory, ResidualMemory
from dtune.comm._stats import Accounting

__all__ = ["CommState", "ddp_hook"]

logger = logging.getLogger(__name__)

Hook = Callable[[Any, Any], "torch.futures.Future[torch.Tensor]"]


class CommState:
    """Per-model state of a compressor: buckets, error-feedback memory, step, accounting.

    ``memory`` defaults to :class:`~dtune.comm.ResidualMemory` for compressors that want error
    feedback and :class:`~dtune.comm.NoMemory` otherwise. ``seed`` seeds every bucket's
    generators (see :class:`~dtune.comm.BucketState`); use the same seed on every rank.

    Example:
        >>> import torch
        >>> from dtune import comm
        >>> state = comm.CommState(comm.FP16())
        >>> grads = [torch.ones(3), torch.full((2, 2), 0.5)]
        >>> state.all_reduce(grads)  # one process: an fp16 round trip
        >>> state.accounting.as_dict()["comm_compression_ratio"]
        2.0
    """

    __slots__ = ("_pending", "accounting", "buckets", "comm", "compressor", "memory", "seed", "step")

    def __init__(
        self,
        compressor: Compressor,
        *,
        memory: Memory | None = None,
        process_group: Any = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(compressor, Compressor):
            raise TypeError(f"`compressor` must be a dtune.comm.Compressor, got {type(compressor).__name__}.")
        if memory is not None and not isinstance(memory, Memory):
            raise TypeError(f"`memory` must be a dtune.comm.Memory, got {type(memory).__name__}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed` must be an integer, got {type(seed).__name__}.")
        self.compressor = compressor
        if memory is None:
            memory = ResidualMemory() if compressor.error_feedback else NoMemory()
        self.memory = memory
        self.accounting = Accounting()
        self.comm = Communicator(process_group, self.accounting)
        self.seed = seed
        self.step = 0
        self.buckets: dict[int, BucketState] = {}
        self._pending: dict[int, dict[str, Any]] = {}
        object.__setattr__(compressor, "_state", self)  # compressor.stats() reads the newest state

    def bucket(self, index: int, shapes: tuple[torch.Size, ...]) -> BucketState:
        """The state of bucket ``index``, made afresh when it is new or its layout changed."""
        state = self.buckets.get(index)
        if state is not None and state.shapes == shapes:
            state.step = self.step
            return state
        changed = state is not None  # DDP rebuilds its buckets after the first step
        state = BucketState(
            index=index, shapes=shapes, rank=self.comm.rank, world_size=self.comm.world_size, seed=self.seed
        )
        state.step = self.step
        if changed:
            logger.debug("bucket %d changed layout; its compressor state starts over", index)
            self.memory.reset(state)
        self.compressor.init_bucket(state)
        saved = self._pending.pop(index, None)
        if saved is not None and tuple(saved["shapes"]) == shapes:
            state.generator.set_state(saved["generator"])
            state.shared_generator.set_state(saved["shared_generator"])
            state.data = copy.deepcopy(saved["data"])
        self.buckets[index] = state
        return state

    def exchange(
        self, index: int, buffer: torch.Tensor, shapes: tuple[torch.Size, ...]
    ) -> torch.futures.Future[torch.Tensor]:
        """Average ``buffer`` (a flat bucket laid out as ``shapes``) across ranks, compressed.

        The future's tensor is ``buffer`` itself, overwritten with the average.
        """
        bucket = self.bucket(index, shapes)
        self.accounting.add(bucket=index, dense=buffer.numel() * buffer.element_size())
        # the memory divides by the world size (sums of the payloads are then averages), fused
        # with adding its residual
        fut = self.compressor.exchange(buffer, bucket, self.comm, self.memory)

        def into_buffer(result: torch.Tensor) -> torch.Tensor:
            if result is not buffer:
                buffer.copy_(result)
            return buffer

        return fut.then(lambda f: into_buffer(f.value()))

    def stats(self) -> dict[str, float]:
        """The accounting as flat numbers (see :class:`~dtune.comm.Accounting`)."""
        return self.accounting.as_dict()

    def end_step(self) -> None:
        self.step += 1
        self.accounting.end_step()

    def all_reduce(self, tensors: list[torch.Tensor], *, bucket: int = 0) -> None:
        """Average ``tensors`` across ranks in place, as one bucket; one call is one step.

        This is the compressor without DDP: for strategies that reduce their own tensors, and
        for one process (where it applies compression and error feedback and nothing else).
        """
        if not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        result = self.exchange(bucket, flat, tuple(t.shape for t in tensors)).wait()
        self.end_step()
        offset = 0
        for tensor in tensors:
            tensor.copy_(result[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: step, residuals, bucket data and generator states."""
        return {
            "step": self.step,
            "memory": self.memory.state_dict(),
            "buckets": {
                index: {
                    "shapes": [tuple(s) for s in b.shapes],
                    "generator": b.generator.get_state(),
                    "shared_generator": b.shared_generator.get_state(),
                    "data": copy.deepcopy(b.data),
                }
                for index, b in self.buckets.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; bucket state is applied when a bucket of that layout appears."""
        self.step = int(state["step"])
        self.memory.load_state_dict(state["memory"])
        self.buckets.clear()
        self._pending = {
            int(i): {**b, "shapes": tuple(torch.Size(s) for s in b["shapes"])}
            for i, b in state["buckets"].items()
        }


def _hook(state: CommState, bucket: Any) -> torch.futures.Future[torch.Tensor]:
    shapes = tuple(g.shape for g in bucket.gradients())
    fut = state.exchange(bucket.index(), bucket.buffer(), shapes)
    if bucket.is_last():
        state.end_step()
    return fut


# DDP inspects the hook's annotations and wants the objects, not the strings that
# ``from __future__ import annotations`` leaves
_hook.__annotations__ = {
    "state": CommState,
    "bucket": torch.distributed.GradBucket,  # type: ignore[attr-defined]
    "return": torch.futures.Future[torch.Tensor],
}


def ddp_hook(
    compressor: Compressor, *, memory: Memory | None = None, process_group: Any = None, seed: int = 0
) -> tuple[CommState, Hook]:
    """``(state, hook)`` for ``DistributedDataParallel.register_comm_hook``.

    Example:
        >>> from dtune import comm
        >>> state, hook = comm.ddp_hook(comm.TopK(ratio=0.01))
        >>> # ddp_model.register_comm_hook(state, hook)
        >>> # ... train ...; compressor statistics: state.accounting.as_dict()
    """
    return CommState(compressor, memory=memory, process_group=process_group, seed=seed), _hook
