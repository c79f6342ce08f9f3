"""QSGD: unbiased stochastic quantization to ``s`` levels per sign, with per-chunk norms.

Alistarh et al., "QSGD: Communication-Efficient SGD via Gradient Quantization and Encoding"
(NeurIPS 2017). Each chunk of ``chunk_size`` entries is scaled by ``s / ||chunk||_2`` and
rounded stochastically to an integer in ``[-s, s]``: ``floor(z + u)`` with ``u ~ U[0, 1)``,
which equals rounding ``|z|`` up with probability ``frac(|z|)`` and keeping the sign, so the
estimate is unbiased and needs no error feedback. Chunked norms are the paper's "bucketing"
(variance grows with the chunk, not the tensor). Levels travel as 4-bit codes when ``s <= 7``
and as int8 otherwise, after the fp32 chunk norms; the paper's Elias coding is not used (its
bit-serial decode costs more on CPU than the bytes it saves here).

Each rank draws its rounding noise from its own generator, seeded per rank and bucket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from dtune.comm._base import BucketState, Collective, Compressor, Payload, check_int

__all__ = ["QSGD"]


@dataclass(frozen=True, kw_only=True)
class QSGD(Compressor):
    """Stochastic quantization to ``levels`` levels per sign; payloads are all-gathered.

    Example:
        >>> import torch
        >>> from dtune import comm
        >>> state = comm.CommState(comm.QSGD(levels=5, chunk_size=2))
        >>> g = [torch.tensor([3.0, 4.0])]  # |g| = 5: both entries land exactly on a level
        >>> state.all_reduce(g)
        >>> g[0].tolist()
        [3.0, 4.0]
    """

    levels: int = 7
    chunk_size: int = 512
    collective: ClassVar[Collective] = Collective.ALL_GATHER

    def __post_init__(self) -> None:
        check_int("levels", self.levels, 1, 127)
        check_int("chunk_size", self.chunk_size, 1)

    @property
    def bits(self) -> int:
        """Bits per entry on the wire: 4 for up to 7 levels per sign, else 8."""
        return 4 if self.levels <= 7 else 8

    def _chunks(self, numel: int) -> int:
        return math.ceil(numel / self.chunk_size)

    def _scales(self, tensor: torch.Tensor) -> torch.Tensor:
        """Per-chunk ``||chunk||_2`` (the last chunk may be short)."""
        numel, size = tensor.numel(), self.chunk_size
        full = numel // size * size
        norms = [tensor[:full].view(-1, size).norm(dim=1)] if full else []
        if full < numel:
            norms.append(tensor[full:].norm().reshape(1))
        return torch.cat(norms)

    def _per_entry(self, values: torch.Tensor, factors: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out = values * factor`` of each entry's chunk, without expanding the factors."""
        numel, size = values.numel(), self.chunk_size
        full = numel // size * size
        if full:
            rows = out[:full].view(-1, size)
            torch.mul(values[:full].view(-1, size), factors[: full // size, None], out=rows)
        if full < numel:
            torch.mul(values[full:], factors[-1], out=out[full:])
        return out

    def init_bucket(self, bucket: BucketState) -> None:
        # numpy's SFC64 draws uniforms about twice as fast as torch's CPU generator; it is
        # seeded from the bucket's own (per-rank) generator, so randomness stays owned
        seed = int(torch.randint(0, 2**62, (1,), generator=bucket.generator))
        bucket.data["rng"] = np.random.Generator(np.random.SFC64(seed))

    def compress(self, tensor: torch.Tensor, bucket: BucketState) -> Payload:
        values = tensor.float()
        numel, chunks = values.numel(), self._chunks(values.numel())
        norms = self._scales(values)
        factors = torch.where(norms > 0, self.levels / norms, torch.zeros_like(norms))
        scaled = self._per_entry(values, factors, bucket.buffer("scaled", numel))
        levels = scaled.numpy()
        noise = bucket.buffer("noise", numel).numpy()
        bucket.data["rng"].random(numel, dtype=np.float32, out=noise)
        np.add(levels, noise, out=levels)
        np.floor(levels, out=levels)  # floor(z + u): |z| rounded up with probability frac(|z|)
        code_bytes = (numel + 1) // 2 if self.bits == 4 else numel
        payload = bucket.buffer("payload", 4 * chunks + code_bytes, torch.uint8)
        payload[: 4 * chunks] = norms.view(torch.uint8)
        if self.bits == 4:
            codes = bucket.buffer("codes", 2 * code_bytes, torch.uint8).numpy()
            codes[-1] = 8  # the pad of an odd count decodes to 0
            np.copyto(codes[:numel].view(np.int8), levels, casting="unsafe")  # two's complement
            pairs = codes.reshape(-1, 2)
            np.add(pairs, np.uint8(8), out=pairs, casting="unsafe")  # [-7, 7] -> [1, 15]: 4 bits
            packed = payload[4 * chunks :].numpy()
            np.left_shift(pairs[:, 1], 4, out=pairs[:, 1])
            np.bitwise_or(pairs[:, 0], pairs[:, 1], out=packed)
        else:
            np.copyto(payload[4 * chunks :].numpy().view(np.int8), levels, casting="unsafe")
        # this rank's dense share (levels * |chunk| / s) is kept for its own part of the sum
        own = self._per_entry(scaled, torch.where(norms > 0, norms / self.levels, 0.0), scaled)
        return Payload(payload, meta=own)

    def _decode(self, payload: Payload, bucket: BucketState) -> torch.Tensor:
        """The dense tensor of one payload, in a work buffer of the bucket."""
        numel = bucket.numel
        chunks = self._chunks(numel)
        norms = payload.tensor[: 4 * chunks].view(torch.float32)
        codes = payload.tensor[4 * chunks :].numpy()
        table = _NIBBLES if self.bits == 4 else _BYTES
        decoded = bucket.buffer("decoded", codes.size * table.shape[1])
        np.take(table, codes, axis=0, out=decoded.numpy().reshape(-1, table.shape[1]))
        return self._per_entry(decoded[:numel], norms / self.levels, decoded[:numel])

    def decompress(self, payload: Payload, bucket: BucketState, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(self._decode(payload, bucket))

    def aggregate(self, payloads: list[Payload], bucket: BucketState, out: torch.Tensor) -> torch.Tensor:
        out.copy_(payloads[bucket.rank].meta)
        for rank, payload in enumerate(payloads):
            if rank != bucket.rank:
                out.add_(self._decode(payload, bucket))
        return out


# decoding tables: byte -> its two 4-bit codes (low nibble first), or its int8 value, as floats
_NIBBLES = np.stack([(np.arange(256) & 15) - 8, (np.arange(256) >> 4) - 8], axis=1).astype(np.float32)
_BYTES = np.arange(256, dtype=np.uint8).view(np.int8).astype(np.float32)[:, None]
