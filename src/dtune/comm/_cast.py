"""Half-precision casts: all-reduce gradients as fp16 or bf16 (2x fewer bytes).

The same as PyTorch's ``fp16_compress_hook`` and ``bf16_compress_hook``: divide by the world
size first (so fp16's range holds the sum), cast, all-reduce, cast back. bf16 keeps fp32's
range with 8 bits of mantissa (Kalamkar et al., "A Study of BFLOAT16 for Deep Learning
Training", 2019); fp16 keeps 11 bits but overflows above 65504.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from dtune.comm._base import BucketState, Collective, Compressor, Payload, check_enum

__all__ = ["BF16", "FP16", "Cast", "Precision"]


class Precision(enum.Enum):
    """The wire format of :class:`Cast`."""

    FP32 = "fp32"
    """No compression: plain all-reduce through the same path (a baseline, and lossless)."""
    FP16 = "fp16"
    BF16 = "bf16"

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.value]


@dataclass(frozen=True, kw_only=True)
class Cast(Compressor):
    """All-reduce in ``precision`` instead of fp32; no error feedback by default.

    Example:
        >>> import torch
        >>> from dtune import comm
        >>> state = comm.CommState(comm.Cast(precision=comm.Precision.BF16))
        >>> g = [torch.tensor([1.0, 1 / 3])]
        >>> state.all_reduce(g)
        >>> g[0].tolist()  # bf16 keeps 8 bits of mantissa
        [1.0, 0.333984375]
    """

    precision: Precision = Precision.FP16
    collective: ClassVar[Collective] = Collective.ALL_REDUCE

    def __post_init__(self) -> None:
        check_enum("precision", self.precision, Precision)

    def compress(self, tensor: torch.Tensor, bucket: BucketState) -> Payload:
        return Payload(bucket.buffer("cast", tensor.numel(), self.precision.dtype).copy_(tensor))

    def decompress(self, payload: Payload, bucket: BucketState, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(payload.tensor)


@dataclass(frozen=True, kw_only=True)
class FP16(Cast):
    """:class:`Cast` to fp16, as PyTorch's ``fp16_compress_hook``.

    Example:
        >>> from dtune import comm, train
        >>> strategy = train.AllReduce(compression=comm.FP16())
    """

    precision: Precision = field(default=Precision.FP16, init=False)


@dataclass(frozen=True, kw_only=True)
class BF16(Cast):
    """:class:`Cast` to bf16, as PyTorch's ``bf16_compress_hook``.

    Example:
        >>> from dtune import comm, train
        >>> strategy = train.AllReduce(compression=comm.BF16())
    """

    precision: Precision = field(default=Precision.BF16, init=False)
