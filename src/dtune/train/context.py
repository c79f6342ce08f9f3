"""Where this worker stands in its group: rank, world size, local rank, device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dtune.runtime import distributed

__all__ = ["TrainContext", "context"]


@dataclass(frozen=True)
class TrainContext:
    """Rank 0 of 1 on CPU when there is no process group, so the same loop runs standalone."""

    rank: int
    world_size: int
    local_rank: int
    device: Any  # torch.device

    @property
    def is_main(self) -> bool:
        """True on the rank whose reports and checkpoints dtune keeps."""
        return self.rank == 0


def context() -> TrainContext:
    """This worker's place in its group and the device it should train on."""
    import torch

    local = distributed.local_rank()
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    return TrainContext(distributed.rank(), distributed.world_size(), local, device)
