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

Every step is a handful of whole-bucket passes, each one vectorised kernel (on one CPU thread a
pass over a 1.6M-entry bucket costs 0.1-0.6 ms, so the count of passes is the cost):

- noise: numpy's SFC64 raw 64-bit outputs, four 16-bit uniforms each (half the random bits of
  float32 uniforms, whose 24 bits buy no accuracy that matters here), added in numpy's fused
  uint16-to-float32 loop to the levels scaled by ``2**16`` (exact: a power of 2), which one
  multiplication scales back: ``floor(z + r / 2**16)`` bit for bit, a rounding probability off
  by less than ``2**-16`` of a level;
- 4-bit codes: ``even + 16 * odd + 136`` in fp32, cast to bytes (both nibbles offset by 8);
- decoding: the two nibbles of each byte are spread into the high halves of two bytes with
  16-bit word operations, then one arithmetic shift of the int8 array sign-extends them, so the
  levels arrive as int8 with no table look-up (and this rank's own levels are never decoded);
- a chunk's scale multiplies its levels as a broadcast over a ``(chunks, chunk_size)`` view,
  and the shares are summed in rank order with one ``addcmul`` each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from dtune.comm._base import BucketState, Collective, Compressor, Payload, check_int, in_float32

__all__ = ["QSGD"]

_NOISE_BITS = 16  # bits of each rounding uniform: u = r / 2**16, r a uniform 16-bit integer
_NOISE_SCALE = float(2**_NOISE_BITS)
_WORD = np.dtype("<u2")  # little-endian 16-bit words (native here; numpy swaps bytes elsewhere)


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

    def _code_bytes(self, numel: int) -> int:
        return (numel + 1) // 2 if self.bits == 4 else numel

    def _scales(self, tensor: torch.Tensor) -> torch.Tensor:
        """Per-chunk ``||chunk||_2`` (the last chunk may be short)."""
        numel, size = tensor.numel(), self.chunk_size
        full = numel // size * size
        norms = [tensor[:full].view(-1, size).norm(dim=1)] if full else []
        if full < numel:
            norms.append(tensor[full:].norm().reshape(1))
        return torch.cat(norms)

    def _per_entry(
        self, values: torch.Tensor, factors: torch.Tensor, out: torch.Tensor, *, accumulate: bool = False
    ) -> torch.Tensor:
        """``out = values * factor`` of each entry's chunk (``out +=`` with ``accumulate``).

        The factors broadcast over a ``(chunks, chunk_size)`` view instead of being expanded.
        """
        numel, size = out.numel(), self.chunk_size
        full = numel // size * size
        parts = [(values[:full].view(-1, size), factors[: full // size, None], out[:full].view(-1, size))]
        if full < numel:
            parts.append((values[full:numel], factors[-1], out[full:]))
        for value, factor, target in parts:
            if not target.numel():
                continue
            if accumulate:
                target.addcmul_(value, factor)
            else:
                torch.mul(value, factor, out=target)
        return out

    def init_bucket(self, bucket: BucketState) -> None:
        # numpy's SFC64 makes random bits faster than torch's CPU generator; it is seeded from
        # the bucket's own (per-rank) generator, so randomness stays owned
        seed = int(torch.randint(0, 2**62, (1,), generator=bucket.generator))
        bucket.data["rng"] = np.random.Generator(np.random.SFC64(seed))

    def _noise(self, bucket: BucketState, numel: int) -> np.ndarray:
        """``numel`` uniform 16-bit integers: SFC64's raw outputs, each split into four."""
        raw: np.ndarray = bucket.data["rng"].bit_generator.random_raw((numel + 3) // 4)
        return raw.view(np.uint16)[:numel]

    def compress(self, tensor: torch.Tensor, bucket: BucketState) -> Payload:
        return self._compress(tensor, bucket, 1)

    def compress_undivided(self, tensor: torch.Tensor, bucket: BucketState) -> Payload:
        divisor = bucket.world_size
        if divisor & (divisor - 1):  # exact only for powers of 2: divide first otherwise
            return super().compress_undivided(tensor, bucket)
        return self._compress(tensor, bucket, divisor)

    def _compress(self, tensor: torch.Tensor, bucket: BucketState, divisor: int) -> Payload:
        """The payload of ``tensor / divisor`` (a power of 2), never dividing ``tensor`` itself.

        The levels do not depend on the scale (``x / ||chunk||`` is the same for ``x / d``),
        and for a power of 2 the chunk norms divide exactly, so the payload is bit for bit the
        one of the divided tensor, one pass over the bucket cheaper.
        """
        values = tensor.float()
        numel, chunks = values.numel(), self._chunks(values.numel())
        norms = self._scales(values)
        # z * 2**16 (scaling by a power of 2 is exact), so that the 16-bit noise adds as integers
        factors = torch.where(norms > 0, (self.levels * _NOISE_SCALE) / norms, torch.zeros_like(norms))
        if divisor > 1:
            norms = norms / divisor
        # an even length, so that 4-bit codes pair entries; the pad entry is level 0
        padded = bucket.buffer("levels", numel + numel % 2)
        levels = self._per_entry(values, factors, padded[:numel])  # z * 2**16, z = x * s / ||chunk||
        np.add(levels.numpy(), self._noise(bucket, numel), out=levels.numpy())
        levels.mul_(1.0 / _NOISE_SCALE).floor_()  # floor(z + u): |z| rounded up with probability frac(|z|)
        padded[numel:] = 0
        payload = bucket.buffer("payload", 4 * chunks + self._code_bytes(numel), torch.uint8)
        payload[: 4 * chunks] = norms.view(torch.uint8)
        codes = payload[4 * chunks :].numpy()
        if self.bits == 4:
            pairs = bucket.buffer("pairs", codes.size)
            torch.add(padded[0::2], padded[1::2], alpha=16, out=pairs)  # exact: |even + 16 odd| <= 119
            np.add(pairs.numpy(), np.float32(8 + 16 * 8), out=codes, casting="unsafe")  # nibbles in [1, 15]
        else:
            np.copyto(codes.view(np.int8), levels.numpy(), casting="unsafe")
        # this rank's levels (and the norms in its payload) give its own share of the sum
        return Payload(payload, meta=levels)

    def _levels(self, payload: Payload, bucket: BucketState) -> torch.Tensor:
        """The levels of another rank's payload, as floats in a work buffer of the bucket."""
        numel = bucket.numel
        codes = payload.tensor[4 * self._chunks(numel) :].numpy()
        if self.bits == 8:
            levels = codes.view(np.int8)
        else:
            levels = bucket.buffer("decoded", 2 * codes.size, torch.int8).numpy()
            # each nibble is level + 8; xor 8 makes it the level as 4-bit two's complement. The
            # little-endian 16-bit word (d << 8) | (d << 4) of a flipped byte d holds its low
            # nibble in bits 4-7 (the first entry's byte) and its high one in bits 12-15, and an
            # arithmetic shift of each byte by 4 sign-extends them; what lands in bits 0-3 and
            # 8-11 is shifted out
            flipped = bucket.buffer("flipped", codes.size, torch.uint8).numpy()
            spare = bucket.buffer("spare", codes.size, torch.int16).numpy().view(_WORD)
            words = levels.view(_WORD)
            np.bitwise_xor(codes, np.uint8(0x88), out=flipped)
            np.left_shift(flipped, 8, out=words, dtype=_WORD)
            np.left_shift(flipped, 4, out=spare, dtype=_WORD)
            np.bitwise_or(words, spare, out=words)
            np.right_shift(levels, 4, out=levels)
        # as floats, like this rank's own levels, so that every rank's share goes through the
        # same kernels (and rounds alike on every rank)
        return bucket.buffer("decoded_levels").copy_(torch.from_numpy(levels[:numel]))

    def _step(self, payload: Payload, bucket: BucketState) -> torch.Tensor:
        """``||chunk|| / s`` per chunk of one payload: what its levels are multiplied by."""
        return payload.tensor[: 4 * self._chunks(bucket.numel)].view(torch.float32) / self.levels

    def decompress(self, payload: Payload, bucket: BucketState, out: torch.Tensor) -> torch.Tensor:
        levels, step = self._levels(payload, bucket), self._step(payload, bucket)
        return in_float32(out, bucket, lambda dense: self._per_entry(levels, step, dense))

    def aggregate(self, payloads: list[Payload], bucket: BucketState, out: torch.Tensor) -> torch.Tensor:
        def total(dense: torch.Tensor) -> torch.Tensor:
            # in rank order, the same kernels on every rank: every rank's sum rounds alike
            # (addcmul fuses its multiply-add, so the order of the terms matters)
            for rank, payload in enumerate(payloads):
                levels = payload.meta if rank == bucket.rank else self._levels(payload, bucket)
                self._per_entry(levels, self._step(payload, bucket), dense, accumulate=rank > 0)
            return dense

        return in_float32(out, bucket, total)
