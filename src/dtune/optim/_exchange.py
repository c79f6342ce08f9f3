"""K-FAC's communication over a :class:`~dtune.optim.WorkPlan` (SC20's layer-wise distribution).

Three exchanges, all no-ops in one process:

- factor statistics: summed over all workers with their example counts, in flat buckets, so
  every worker folds the same averages into the same running factors;
- decompositions: broadcast by each layer's inverse worker along its column of gradient
  workers (COMM-OPT and HYBRID), one flat message per source;
- preconditioned gradients: broadcast by each layer's gradient worker along its row (MEM-OPT
  and HYBRID), one flat message per source.

Every worker takes part in the same collectives in the same order: which layers are sent is
decided from state that is identical on all workers (the plan and the all-reduced factors).
"""

from __future__ import annotations

from typing import Any

import torch

from dtune.optim._assignment import WorkPlan
from dtune.optim._config import Method
from dtune.optim._layers import KFACLayer
from dtune.runtime import distributed

__all__ = ["Exchange"]


class Exchange:
    """The process groups of a plan (created on every worker) and the three exchanges."""

    def __init__(self, plan: WorkPlan, rank: int) -> None:
        self.plan = plan
        self.rank = rank
        self.column_groups: list[Any] = [None] * plan.columns
        self.row_groups: list[Any] = [None] * plan.grad_workers
        if 1 < plan.grad_workers < plan.world_size:  # every rank creates every group, in order
            self.column_groups = [distributed.new_group(plan.column_ranks(c)) for c in range(plan.columns)]
            self.row_groups = [distributed.new_group(plan.row_ranks(r)) for r in range(plan.grad_workers)]

    def reduce_statistics(self, layers: list[KFACLayer], bucket_mb: float) -> None:
        """Sum every layer's statistics and example counts over all workers."""
        if self.plan.world_size == 1 or not layers:
            return
        weights = torch.tensor(
            [[layer.a_weight, layer.g_weight] for layer in layers], device=layers[0].device
        )
        stats = [t for layer in layers for t in layer.statistics()]
        distributed.all_reduce_sum_bucketed([*stats, weights], bucket_mb=bucket_mb)
        for layer, (a_weight, g_weight) in zip(layers, weights.tolist(), strict=True):
            layer.a_weight, layer.g_weight = a_weight, g_weight

    def share_decompositions(self, layers: list[KFACLayer], method: Method) -> None:
        """Send each decomposition from its inverse worker to the layer's other gradient workers."""
        plan = self.plan
        if plan.grad_workers == 1:
            return  # MEM-OPT: the computing worker is the layer's only gradient worker
        column = plan.column_of(self.rank)
        for src in plan.column_ranks(column):
            sent = [
                layer for index, layer in enumerate(layers)
                if plan.columns_of_layers[index] == column and plan.inverse_workers[index] == src
                and layer.A is not None  # the same on every worker: factors are all-reduced
            ]  # fmt: skip
            buffers = [t for layer in sent for t in layer.decomposition_buffers(method)]
            distributed.broadcast_tensors_in(buffers, src=src, group=self.column_groups[column])
            if src != self.rank:
                for layer in sent:
                    layer.version += 1

    def share_gradients(
        self, grads: dict[int, torch.Tensor], preconditioned: dict[int, torch.Tensor]
    ) -> None:
        """Fill ``preconditioned`` for every layer in ``grads`` from the gradient workers of this row."""
        plan = self.plan
        if plan.columns == 1:
            return  # COMM-OPT: every worker preconditions every layer itself
        row = plan.row_of(self.rank)
        for src in plan.row_ranks(row):
            indices = [index for index in grads if plan.grad_source(index, self.rank) == src]
            if src != self.rank:
                preconditioned.update({index: torch.empty_like(grads[index]) for index in indices})
            distributed.broadcast_tensors_in(
                [preconditioned[index] for index in indices], src=src, group=self.row_groups[row]
            )
