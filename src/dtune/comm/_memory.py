"""Error-feedback memory: what a biased compressor held back is added to the next gradient.

Error feedback turns biased compressors (top-k, sign, low rank) into ones that converge like
SGD: nothing is lost, only delayed (Seide et al., "1-Bit Stochastic Gradient Descent", 2014;
Stich et al., "Sparsified SGD with Memory", NeurIPS 2018; Karimireddy et al., "Error Feedback
Fixes SignSGD and other Gradient Compression Schemes", ICML 2019). Kept apart from the
compressors as in GRACE, so any compressor can run with or without it.
"""

from __future__ import annotations

import abc
from typing import Any

import torch

from dtune.comm._base import BucketState

__all__ = ["Memory", "NoMemory", "ResidualMemory", "scaled_add"]


def scaled_add(out: torch.Tensor, tensor: torch.Tensor, divisor: int) -> torch.Tensor:
    """``out += tensor / divisor`` in place, bit for bit, in one pass when ``divisor`` is a power of 2.

    Multiplying by ``1 / divisor`` equals dividing exactly when that reciprocal is a power of 2,
    so the division rides along in ``add_``'s ``alpha``; any other divisor is divided first
    (two passes), so that results never depend on how the division was fused.
    """
    if divisor & (divisor - 1) == 0:
        return out.add_(tensor, alpha=1.0 / divisor) if divisor > 1 else out.add_(tensor)
    return out.add_(torch.div(tensor, divisor))


class Memory(abc.ABC):
    """Per-bucket memory: ``compensate`` before compressing, ``update`` with what was held back."""

    keeps_residual: bool = True
    divides_only: bool = False
    """``compensate`` only divides by the world size: compressors may fuse that division
    (:meth:`Compressor.compress_undivided <dtune.comm.Compressor.compress_undivided>`)."""

    @abc.abstractmethod
    def compensate(self, tensor: torch.Tensor, bucket: BucketState) -> torch.Tensor:
        """``tensor / bucket.world_size`` plus what was held back for this bucket.

        The division by the world size (so that the sum over ranks is the average) happens
        here rather than before, so that a memory can fuse it with adding the residual: one
        pass over the bucket instead of two (see :func:`scaled_add`). A memory that keeps
        residuals returns a tensor it owns (never ``tensor``, which is the bucket the result is
        written to), so compressors may turn it into the next residual in place and hand that
        to :meth:`update`; ``tensor`` itself may be left undivided.
        """

    @abc.abstractmethod
    def update(self, residual: torch.Tensor, bucket: BucketState) -> None:
        """Keep ``residual`` (the compensated tensor minus what was sent) for the next step."""

    def reset(self, bucket: BucketState) -> None:  # noqa: B027 (optional hook)
        """Forget the bucket (its layout changed, e.g. when DDP rebuilds buckets after step 1)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (optional hook)
        """Restore what :meth:`state_dict` returned."""


class NoMemory(Memory):
    """No error feedback: what the compressor drops is lost (right for unbiased compressors).

    Example:
        >>> from dtune import comm
        >>> state = comm.CommState(comm.TopK(ratio=0.5), memory=comm.NoMemory())
    """

    keeps_residual = False
    divides_only = True

    def compensate(self, tensor: torch.Tensor, bucket: BucketState) -> torch.Tensor:
        if bucket.world_size > 1:
            tensor.div_(bucket.world_size)
        return tensor

    def update(self, residual: torch.Tensor, bucket: BucketState) -> None:
        raise RuntimeError("NoMemory keeps no residual; compressors must check `keeps_residual`.")


class ResidualMemory(Memory):
    """Keep the residual ``e`` per bucket; the next input is ``g + decay * e``.

    ``decay`` below 1 forgets old residuals geometrically (GRACE's ``beta``); 1 is plain error
    feedback, under which ``sent + residual == input`` holds exactly at every step.

    Example:
        >>> import torch
        >>> from dtune import comm
        >>> state = comm.CommState(comm.TopK(ratio=0.25), memory=comm.ResidualMemory())
        >>> grad = torch.tensor([4.0, -1.0, 0.5, 2.0])
        >>> state.all_reduce([grad])  # one process: the top entry is "sent", the rest kept
        >>> grad.tolist(), state.memory.residuals[0].tolist()
        ([4.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.5, 2.0])
    """

    def __init__(self, *, decay: float = 1.0) -> None:
        if isinstance(decay, bool) or not isinstance(decay, int | float):
            raise TypeError(f"`decay` must be a number, got {type(decay).__name__}.")
        if not 0 <= decay <= 1:
            raise ValueError(f"The value of `decay` is {decay!r}, but must be in [0, 1].")
        self.decay = float(decay)
        self.residuals: dict[int, torch.Tensor] = {}

    def compensate(self, tensor: torch.Tensor, bucket: BucketState) -> torch.Tensor:
        residual = self.residuals.get(bucket.index)
        if residual is None or residual.shape != tensor.shape or residual.dtype != tensor.dtype:
            residual = torch.div(tensor, bucket.world_size)
        else:
            if self.decay != 1.0:
                residual.mul_(self.decay)
            scaled_add(residual, tensor, bucket.world_size)
        self.residuals[bucket.index] = residual  # compensated now; the residual again after update
        return residual

    def update(self, residual: torch.Tensor, bucket: BucketState) -> None:
        self.residuals[bucket.index] = residual

    def reset(self, bucket: BucketState) -> None:
        self.residuals.pop(bucket.index, None)

    def state_dict(self) -> dict[str, Any]:
        return {"residuals": {i: r.clone() for i, r in self.residuals.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.residuals = {int(i): r.clone() for i, r in state.get("residuals", {}).items()}
