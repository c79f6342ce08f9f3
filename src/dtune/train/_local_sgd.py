"""Local SGD: each worker takes ``period`` optimizer steps alone, then all average their models.

Averaging every ``period`` steps divides communication by ``period`` (Stich, "Local SGD
Converges Fast and Communicates Little", ICLR 2019; Lin et al., "Don't Use Large Mini-Batches,
Use Local SGD", ICLR 2020, for the warm-up). Unlike PyTorch's ``PeriodicModelAverager``, buffers
(e.g. BatchNorm running statistics) are averaged too, so replicas agree on them.
"""

from __future__ import annotations

from typing import Any

from dtune.runtime import distributed
from dtune.train.strategy import Strategy

__all__ = ["LocalSGD"]


class LocalSGD(Strategy):
    """Average parameters and buffers every ``period`` steps (every step during warm-up).

    With plain SGD and ``period=1`` this equals gradient all-reduce.

    Example:
        >>> from dtune import train
        >>> strategy = train.LocalSGD(period=8, warmup_steps=100)
    """

    def __init__(self, period: int, warmup_steps: int = 0) -> None:
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"The value of `period` is {period!r}, but must be an integer >= 1.")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"The value of `warmup_steps` is {warmup_steps!r}, but must be an integer >= 0.")
        self.period = period
        self.warmup_steps = warmup_steps
        self.steps = 0
        self.averages = 0
        self._model: Any = None

    def wrap(self, model: Any, optimizer: Any) -> tuple[Any, Any]:
        self._model = model
        distributed.broadcast_tensors(self._tensors())  # every replica starts from rank 0's model
        return model, optimizer

    def _tensors(self) -> list[Any]:
        return [*self._model.parameters(), *self._model.buffers()]

    def after_step(self, optimizer: Any) -> None:
        self.steps += 1
        if self.steps <= self.warmup_steps or self.steps % self.period == 0:
            distributed.all_reduce_mean([t.data for t in self._tensors()])
            self.averages += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "averages": self.averages}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.averages = int(state.get("averages", 0))
