"""EF-signSGD: one bit per entry plus a scale per tensor, with error feedback.

Karimireddy et al., "Error Feedback Fixes SignSGD and other Gradient Compression Schemes"
(ICML 2019): send ``(||p||_1 / d) * sign(p)`` for ``p = g + e`` and keep ``e = p - sent``. The
scale is per tensor of the bucket (per layer, as in the paper) so that layers of different
gradient size keep their own magnitude. Plain signSGD without the memory does not converge in
general; this is also what the "1-bit SGD" of Seide et al. (Interspeech 2014) does, with one
scale instead of two per column. Ranks' scales differ, so the packed bits are all-gathered
(``d/8`` bytes per rank) and every rank decodes and sums them in rank order.

On CPU the cost is the number of passes over the bucket, so each is one vectorised kernel:
numpy's comparison and ``packbits`` to encode; this rank's dense share ``2 s * [p >= 0] - s``
(exactly ``+-s``) kept from the encoding, as the residual's subtrahend and as this rank's part
of the sum; another rank's bits unpacked to bytes (``unpackbits``, no table look-up) and turned
into ``+-s'`` the same way, a cast to floats and one fused multiply-add. Shares are summed in
rank order, so every rank rounds alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from dtune.comm._base import BucketState, Collective, Compressor, Payload, in_float32

__all__ = ["EFSignSGD"]


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
        magnitude = torch.abs(values, out=bucket.buffer("magnitude"))
        scales = torch.stack([view.mean() for view in bucket.views(magnitude)])
        positive = bucket.buffer("positive", dtype=torch.bool).numpy()
        np.greater_equal(values.numpy(), 0, out=positive)
        count = len(bucket.shapes)
        payload = bucket.buffer("payload", 4 * count + (values.numel() + 7) // 8, torch.uint8)
        payload[: 4 * count] = scales.view(torch.uint8)
        payload[4 * count :] = torch.from_numpy(np.packbits(positive, bitorder="little"))
        # what this rank sends, dense: kept for the residual and for its own share of the sum
        sent = _signed(positive, scales.tolist(), bucket, bucket.buffer("sent"))
        return Payload(payload, meta=sent)

    def _terms(self, payload: Payload, bucket: BucketState, out: torch.Tensor) -> torch.Tensor:
        """Write the dense tensor of one payload (exactly ``+-scale`` per entry) into ``out``."""
        count = len(bucket.shapes)
        scales = payload.tensor[: 4 * count].view(torch.float32).tolist()
        bits = np.unpackbits(payload.tensor[4 * count :].numpy(), count=bucket.numel, bitorder="little")
        return _signed(bits, scales, bucket, out)

    def decompress(self, payload: Payload, bucket: BucketState, out: torch.Tensor) -> torch.Tensor:
        return in_float32(out, bucket, lambda dense: self._terms(payload, bucket, dense))

    def aggregate(self, payloads: list[Payload], bucket: BucketState, out: torch.Tensor) -> torch.Tensor:
        # summed in rank order, so that every rank rounds alike; the first two terms commute
        # exactly, so rank 0 also starts with a decoded term, written straight into the result
        order = list(range(len(payloads)))
        if bucket.rank == 0 and len(order) > 1:
            order[:2] = [1, 0]

        def total(dense: torch.Tensor) -> torch.Tensor:
            first, *rest = order
            if first == bucket.rank:  # this rank's own share, already dense
                dense.copy_(payloads[first].meta)
            else:
                self._terms(payloads[first], bucket, dense)
            for rank in rest:
                if rank == bucket.rank:
                    dense.add_(payloads[rank].meta)
                else:
                    dense.add_(self._terms(payloads[rank], bucket, bucket.buffer("term")))
            return dense

        return in_float32(out, bucket, total)

    def residual(self, tensor: torch.Tensor, payload: Payload, bucket: BucketState) -> torch.Tensor:
        return tensor.sub_(payload.meta)  # in place: the compensated bucket belongs to the memory


def _signed(bits: np.ndarray, scales: list[float], bucket: BucketState, out: torch.Tensor) -> torch.Tensor:
    """``out = scale * (2 bit - 1)`` per tensor of the bucket, from 0/1 ``bits`` (bool or uint8).

    The bits become floats in one numpy cast, then ``-s + 2 s * bit`` is one ``add`` per tensor;
    both exact (the product is ``2 s`` or 0), so a rank's own share and the same share decoded
    on another rank are equal bit for bit.
    """
    np.copyto(out.numpy(), bits, casting="unsafe")
    for view, scale in zip(bucket.views(out), scales, strict=True):
        torch.add(torch.tensor(-scale), view, alpha=2 * scale, out=view)
    return out
