"""EF-signSGD: one bit per entry plus a scale per tensor, with error feedback.

Karimireddy et al., "Error Feedback Fixes SignSGD and other Gradient Compression Schemes"
(ICML 2019): send ``(||p||_1 / d) * sign(p)`` for ``p = g + e`` and keep ``e = p - sent``. The
scale is per tensor of the bucket (per layer, as in the paper) so that layers of different
gradient size keep their own magnitude. Plain signSGD without the memory does not converge in
general; this is also what the "1-bit SGD" of Seide et al. (Interspeech 2014) does, with one
scale instead of two per column. Ranks' scales differ, so the packed bits are all-gathered
(``d/8`` bytes per rank) and every rank decodes and sums them in rank order.

Bits are packed with numpy's ``packbits`` and decoded through a 256-entry table (one byte to
eight signs), each a single pass over the bucket: on CPU these are the costs that matter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from dtune.comm._base import BucketState, Collective, Compressor, Payload

__all__ = ["EFSignSGD"]

# _SIGNS[b] = the eight signs (+1 for a set bit, least significant bit first) of byte b
_SIGNS = np.where((np.arange(256)[:, None] >> np.arange(8)) & 1, 1.0, -1.0).astype(np.float32)


@dataclass(frozen=True, kw_only=True)
class EFSignSGD(Compressor):
    """Scaled sign compression (1 bit per entry), error feedback on by default.

    Zero maps to +1 (the error feedback absorbs the difference).

    Example:
        >>> import torch
        >>> from dtune import comm
        >>> state = comm.CommState(comm.EFSignSGD())
        >>> g = [torch.tensor([2.0, -1.0, 0.5, -0.5])]  # mean |g| = 1
        >>> state.all_reduce(g)
        >>> g[0].tolist(), state.memory.residuals[0].tolist()
        ([1.0, -1.0, 1.0, -1.0], [1.0, 0.0, -0.5, 0.5])
    """

    collective: ClassVar[Collective] = Collective.ALL_GATHER

    @property
    def error_feedback(self) -> bool:
        return True

    def compress(self, tensor: torch.Tensor, bucket: BucketState) -> Payload:
        values = tensor.float()
        scales = torch.stack([view.abs().mean() for view in bucket.views(values)])
        positive = bucket.buffer("positive", dtype=torch.bool)
        np.greater_equal(values.numpy(), 0, out=positive.numpy())
        packed = torch.from_numpy(np.packbits(positive.numpy(), bitorder="little"))
        # what this rank sends, dense: kept for the residual and for its own share of the sum
        sent = bucket.buffer("sent")
        for view, out, scale in zip(bucket.views(positive), bucket.views(sent), scales.tolist(), strict=True):
            signed = out.numpy()
            np.multiply(view.numpy(), np.float32(2 * scale), out=signed)
            np.subtract(signed, np.float32(scale), out=signed)
        return Payload(torch.cat([scales.view(torch.uint8), packed]), meta=sent)

    def _signs(self, payload: Payload, bucket: BucketState) -> tuple[torch.Tensor, list[float]]:
        """The +-1 signs of one payload (a work buffer of the bucket) and its scales."""
        count = len(bucket.shapes)
        scales = payload.tensor[: 4 * count].view(torch.float32).tolist()
        packed = payload.tensor[4 * count :].numpy()
        signs = bucket.buffer("signs", 8 * packed.size)
        np.take(_SIGNS, packed, axis=0, out=signs.numpy().reshape(-1, 8))
        return signs[: bucket.numel], scales

    def decompress(self, payload: Payload, bucket: BucketState, out: torch.Tensor) -> torch.Tensor:
        signs, scales = self._signs(payload, bucket)
        for view, target, scale in zip(bucket.views(signs), bucket.views(out), scales, strict=True):
            torch.mul(view, scale, out=target)
        return out

    def aggregate(self, payloads: list[Payload], bucket: BucketState, out: torch.Tensor) -> torch.Tensor:
        out.copy_(payloads[bucket.rank].meta)  # this rank's own share, already dense
        for rank, payload in enumerate(payloads):
            if rank != bucket.rank:
                signs, scales = self._signs(payload, bucket)
                for view, target, scale in zip(bucket.views(signs), bucket.views(out), scales, strict=True):
                    target.add_(view, alpha=scale)
        return out

    def residual(self, tensor: torch.Tensor, payload: Payload, bucket: BucketState) -> torch.Tensor:
        return tensor.sub_(payload.meta)  # in place: the compensated bucket belongs to the memory
