"""The model-synchronisation rules of ShadowSync and of their foreground counterparts.

Each rule turns the dense vector a trainer sent, ``x`` (its parameters and floating-point
buffers, flattened), into the vector it should now hold, ``x_new``; the caller applies it as a
delta or an overwrite (:class:`Apply`). With m trainers:

- **MA**, model averaging: ``x_new = mean_j x_j`` (all-reduce among the trainers).
- **EASGD**, elastic averaging (Zhang, Choromanska & LeCun, "Deep learning with Elastic
  Averaging SGD", NeurIPS 2015): a centre variable ``c`` lives on a sync server; one exchange
  sends ``x`` and atomically does ``c <- c + a (x - c)`` there, and the trainer takes
  ``x_new = x - a (x - c_old)``. The moving rate ``a`` defaults to ``0.9 / m`` (the paper's
  ``beta = m a = 0.9``).
- **BMUF**, block-wise model-update filtering (Chen & Huo, "Scalable training of deep learning
  machines by incremental block training with intra-block parallel optimization and blockwise
  model-update filtering", ICASSP 2016): the replicas started the block from
  ``s = w + eta D`` (Nesterov) or ``s = w``; the block's update is ``G = mean_j x_j - s``,
  then ``D <- eta D + zeta G``, ``w <- w + D`` and ``x_new = w + eta D`` (Nesterov) or ``w``.
  Block momentum ``eta`` defaults to ``1 - 1/m``, block learning rate ``zeta`` to 1. ``G`` is
  measured from the block's start, not from ``w``: with no local progress ``G = 0`` and the
  momentum decays, which matters when a shadow thread runs many blocks per training step.

The pure update functions are exposed for tests; the rule objects add the communication and
the state a checkpoint must hold.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dtune.runtime import distributed

__all__ = [
    "Apply",
    "DenseReplica",
    "SyncAlgorithm",
    "bmuf_update",
    "easgd_centre_update",
    "easgd_replica_update",
    "make_rule",
]


class SyncAlgorithm(enum.Enum):
    """How trainers reconcile their dense replicas."""

    EASGD = "easgd"  #: elastic averaging around a centre variable held by a sync server
    MA = "ma"  #: model averaging (all-reduce mean of the replicas)
    BMUF = "bmuf"  #: model averaging filtered by block momentum (Nesterov by default)
    ALLREDUCE = "allreduce"  #: foreground only: average dense gradients before every step
    NONE = "none"  #: foreground only: never sync dense replicas (the throughput bound)


class Apply(enum.Enum):
    """How a background sync result lands on a replica that kept training meanwhile."""

    DELTA = "delta"  #: x += x_new - x_sent: local updates made during the sync are kept
    OVERWRITE = "overwrite"  #: x = x_new: local updates made during the sync are lost


def easgd_centre_update(centre: torch.Tensor, replica: torch.Tensor, moving_rate: float) -> torch.Tensor:
    """Server side: ``centre += a (replica - centre)`` in place; returns the centre before it."""
    before = centre.clone()
    centre.add_(replica - before, alpha=moving_rate)
    return before


def easgd_replica_update(replica: torch.Tensor, centre: torch.Tensor, moving_rate: float) -> torch.Tensor:
    """Trainer side: the replica pulled towards ``centre`` (the centre it was exchanged with)."""
    return replica - moving_rate * (replica - centre)


def bmuf_update(
    mean: torch.Tensor,
    global_model: torch.Tensor,
    momentum: torch.Tensor,
    *,
    block_momentum: float,
    block_lr: float,
    nesterov: bool,
) -> torch.Tensor:
    """One BMUF block: updates ``global_model`` and ``momentum`` in place, returns ``x_new``."""
    start = global_model + block_momentum * momentum if nesterov else global_model.clone()
    momentum.mul_(block_momentum).add_(mean - start, alpha=block_lr)
    global_model.add_(momentum)
    return global_model + block_momentum * momentum if nesterov else global_model.clone()


class DenseReplica:
    """The dense state of a model seen as one flat vector: parameters, then float buffers.

    Reads and writes go through ``.data`` on purpose: a background sync writing into a
    parameter that autograd saved for the backward in flight must not invalidate that backward
    (Hogwild semantics, as in ShadowSync); the foreground simply sees the new values next step.
    Integer buffers (e.g. BatchNorm's ``num_batches_tracked``) are counters, not averaged.
    """

    def __init__(self, params: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor]) -> None:
        self.tensors = [p.data for p in params] + [b for b in buffers if b.is_floating_point()]
        self.sizes = [t.numel() for t in self.tensors]
        self.numel = sum(self.sizes)
        dtypes = {t.dtype for t in self.tensors}
        if len(dtypes) > 1:
            raise TypeError(
                f"Dense parameters and buffers must share one dtype, got {sorted(map(str, dtypes))}."
            )
        self.dtype = dtypes.pop() if dtypes else torch.float32

    def snapshot(self) -> torch.Tensor:
        if not self.tensors:
            return torch.zeros(0, dtype=self.dtype)
        return torch.cat([t.reshape(-1) for t in self.tensors])

    def _chunks(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [c.view_as(t) for c, t in zip(torch.split(flat, self.sizes), self.tensors, strict=True)]

    def add_(self, delta: torch.Tensor) -> None:
        if self.tensors:
            torch._foreach_add_(self.tensors, self._chunks(delta))

    def copy_(self, values: torch.Tensor) -> None:
        for tensor, chunk in zip(self.tensors, self._chunks(values), strict=True):
            tensor.copy_(chunk)

    def apply(self, new: torch.Tensor, sent: torch.Tensor, how: Apply) -> None:
        if how is Apply.DELTA:
            self.add_(new - sent)
        else:
            self.copy_(new)


class Rule:
    """One algorithm's exchange: ``exchange(x, stop) -> (x_new, anyone_stopping)``.

    ``stop`` rides along with the data so that peers pairing their rounds (MA, BMUF) leave
    after the same round; a rule with a server only (EASGD) stops alone.
    """

    def exchange(self, x: torch.Tensor, stop: bool = False) -> tuple[torch.Tensor, bool]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def release(self) -> None:
        """Let go of the process group (destroyed on close): its threads end with the last reference."""


class _Average(Rule):
    def __init__(self, group: Any, trainers: int) -> None:
        self.group = group
        self.trainers = trainers
        self.released = False

    def release(self) -> None:
        self.group, self.released = None, True

    def _mean(self, x: torch.Tensor, stop: bool) -> tuple[torch.Tensor, bool]:
        if self.released:
            raise RuntimeError("This sync rule's process group is closed (the strategy was closed).")
        buffer = torch.cat([x, x.new_tensor([1.0 if stop else 0.0])])
        distributed.all_reduce_sum_bucketed([buffer], group=self.group)
        return buffer[:-1] / self.trainers, bool(buffer[-1] > 0)

    def exchange(self, x: torch.Tensor, stop: bool = False) -> tuple[torch.Tensor, bool]:
        return self._mean(x, stop)


class _BlockMomentum(_Average):
    def __init__(
        self, group: Any, trainers: int, start: torch.Tensor, *, eta: float, zeta: float, nesterov: bool
    ):
        super().__init__(group, trainers)
        self.global_model = start.clone()
        self.momentum = torch.zeros_like(start)
        self.eta, self.zeta, self.nesterov = eta, zeta, nesterov

    def exchange(self, x: torch.Tensor, stop: bool = False) -> tuple[torch.Tensor, bool]:
        mean, stopping = self._mean(x, stop)
        new = bmuf_update(
            mean,
            self.global_model,
            self.momentum,
            block_momentum=self.eta,
            block_lr=self.zeta,
            nesterov=self.nesterov,
        )
        return new, stopping

    def state_dict(self) -> dict[str, Any]:
        return {"global": self.global_model.clone(), "momentum": self.momentum.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_model.copy_(state["global"])
        self.momentum.copy_(state["momentum"])


class _Elastic(Rule):
    def __init__(
        self, exchange_with_centre: Callable[[torch.Tensor], torch.Tensor], moving_rate: float
    ) -> None:
        self.exchange_with_centre = exchange_with_centre
        self.moving_rate = moving_rate

    def exchange(self, x: torch.Tensor, stop: bool = False) -> tuple[torch.Tensor, bool]:
        centre = self.exchange_with_centre(x)
        return easgd_replica_update(x, centre, self.moving_rate), stop


def make_rule(
    algorithm: SyncAlgorithm,
    *,
    group: Any,
    trainers: int,
    start: torch.Tensor,
    exchange_with_centre: Callable[[torch.Tensor], torch.Tensor] | None,
    moving_rate: float,
    block_momentum: float,
    block_lr: float,
    nesterov: bool,
) -> Rule:
    """The rule object for ``algorithm`` (EASGD needs ``exchange_with_centre``, a server call)."""
    if algorithm is SyncAlgorithm.MA:
        return _Average(group, trainers)
    if algorithm is SyncAlgorithm.BMUF:
        return _BlockMomentum(group, trainers, start, eta=block_momentum, zeta=block_lr, nesterov=nesterov)
    if algorithm is SyncAlgorithm.EASGD:
        if exchange_with_centre is None:
            raise ValueError("EASGD needs a sync server for its centre variable (servers >= 1).")
        return _Elastic(exchange_with_centre, moving_rate)
    raise ValueError(
        f"The value of `algorithm` is {algorithm}, but a sync rule must be one of EASGD, MA, BMUF."
    )
