"""Stale replicas of peer models, refreshed by a double-buffered all-gather of their weights.

Codistillation (Sodhani et al., "A Closer Look at Codistillation for Distributed Training",
arXiv 2010.02838; Anil et al., ICLR 2018) exchanges parameters, not predictions: each worker
keeps a copy of every other model and runs it on its own batch. This module owns those copies
and the exchange that refreshes them; :mod:`dtune.train._codistillation` decides when.

Each member of the exchange group (one worker per model, in model order) packs its parameters
and buffers into one byte buffer, every tensor at a 16-byte aligned offset so one message
carries every dtype (BatchNorm's int64 counter included). The all-gather writes a *back* buffer;
:meth:`ReplicaExchange.make_visible` copies it whole into the *front* buffer between two steps.
The replicas' tensors are views into the front buffer, so a forward pass never sees a
half-written replica, however long the gather takes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dtune.runtime import distributed

if TYPE_CHECKING:
    import torch

__all__ = ["ReplicaExchange"]

_ALIGN = 16  # bytes: an offset every dtype can be viewed at


def _tensors(module: Any) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


@dataclass
class _Pending:
    """A snapshot gathered (or being gathered) into its back buffer, not yet visible."""

    step: int
    buffer: torch.Tensor
    work: Any = None
    send: Any = None  # kept alive until the all-gather has read it


class ReplicaExchange:
    """The other models' replicas on one worker, and the exchange that refreshes them.

    Example:
        >>> import torch
        >>> exchange = ReplicaExchange(torch.nn.Linear(2, 2), models=1, index=0, group=None)
        >>> exchange.nbytes, exchange.replicas
        (32, [])
    """

    def __init__(self, model: Any, *, models: int, index: int, group: Any) -> None:
        import torch

        self._model, self._models, self._group = model, models, group
        tensors = _tensors(model)
        self._slots: list[tuple[int, int]] = []
        offset = 0
        for tensor in tensors:
            size = tensor.numel() * tensor.element_size()
            self._slots.append((offset, size))
            offset += -(-size // _ALIGN) * _ALIGN
        self.nbytes = max(offset, _ALIGN)  # bytes each member sends per exchange
        device = tensors[0].device if tensors else torch.device("cpu")
        self._front = torch.zeros(models * self.nbytes, dtype=torch.uint8, device=device)
        self.replicas: list[Any] = []
        for j in range(models):
            if j != index:
                replica = copy.deepcopy(model).eval().requires_grad_(False)
                replica.zero_grad(set_to_none=True)
                view = self._front[j * self.nbytes : (j + 1) * self.nbytes]
                for tensor, (start, size) in zip(_tensors(replica), self._slots, strict=True):
                    tensor.data = view[start : start + size].view(tensor.dtype).view(tensor.shape)
                self.replicas.append(replica)
        self.snapshot_step = 0  # the step the visible replicas were taken at
        self.counters = {"exchanges": 0, "bytes_sent": 0, "bytes_received": 0}
        self._pending: _Pending | None = None

    def start(self, step: int, *, blocking: bool) -> None:
        """Snapshot this model (after ``step`` steps) and gather everyone's into the back buffer."""
        import torch

        self.make_visible()  # at most one gather in flight
        send = torch.zeros(self.nbytes, dtype=torch.uint8, device=self._front.device)  # zero padding
        for tensor, (start, size) in zip(_tensors(self._model), self._slots, strict=True):
            send[start : start + size].view(tensor.dtype).copy_(tensor.detach().reshape(-1))
        buffer, work = distributed.all_gather_flat(send, self._group, async_op=not blocking)
        self._pending = _Pending(step, buffer, work, send)
        self.counters["exchanges"] += 1
        self.counters["bytes_sent"] += self.nbytes
        self.counters["bytes_received"] += (self._models - 1) * self.nbytes
        if blocking:
            self.make_visible()

    def pending_step(self) -> int | None:
        """The step of the snapshot gathered but not yet visible, if any."""
        return None if self._pending is None else self._pending.step

    def wait(self) -> None:
        """Wait until the gather in flight, if any, has landed in the back buffer."""
        if self._pending is not None and self._pending.work is not None:
            self._pending.work.wait()
            self._pending.work = self._pending.send = None

    def make_visible(self) -> None:
        """Wait for the pending snapshot, if any, and copy it whole into the front buffer."""
        if self._pending is None:
            return
        self.wait()
        self._front.copy_(self._pending.buffer)
        self.snapshot_step, self._pending = self._pending.step, None

    def state_dict(self) -> dict[str, Any]:
        """The visible snapshot of every model, and the pending one (waited for, kept pending)."""
        self.wait()
        pending = self._pending
        return {
            "snapshot_step": self.snapshot_step,
            "front": self._front.clone(),
            "pending": None if pending is None else {"step": pending.step, "buffer": pending.buffer.clone()},
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wait()
        self._front.copy_(state["front"])
        self.snapshot_step = int(state["snapshot_step"])
        self.counters = {key: int(state["counters"][key]) for key in self.counters}
        pending = state["pending"]
        self._pending = None
        if pending is not None:
            self._pending = _Pending(int(pending["step"]), pending["buffer"].to(self._front.device))

    def close(self) -> None:
        try:
            self.wait()
        except Exception:  # a peer that left already: nothing will land
            self._pending = None
