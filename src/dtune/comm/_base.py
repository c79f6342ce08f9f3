"""The compressor contract: compress, decompress, aggregate; the collective is the compressor's choice.

The split follows GRACE (Xu et al., "GRACE: A Compressed Communication Framework for
Distributed Machine Learning", ICDCS 2021): a *compressor* turns a tensor into a payload and
back, a *memory* (error feedback, :mod:`dtune.comm._memory`) keeps what was held back, and a
*communicator* (:mod:`dtune.comm._communicator`) moves payloads. Unlike GRACE, the unit of work
is a DDP gradient bucket (one flat buffer holding several parameters' gradients), so the same
compressor runs as a DDP communication hook with compute/communication overlap.

A compressor object holds hyperparameters only. Everything that changes during training (error
residuals, PowerSGD's warm-start factors, DCT's threshold, random generators) lives in a
:class:`BucketState` per bucket, created and owned by a :class:`~dtune.comm.CommState`.
"""

from __future__ import annotations

import abc
import enum
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from dtune.comm._communicator import Communicator
    from dtune.comm._hook import CommState
    from dtune.comm._memory import Memory

__all__ = ["BucketState", "Collective", "Compressor", "Payload"]


class Collective(enum.Enum):
    """How payloads travel; each compressor declares the one its payload needs."""

    ALL_REDUCE = "all_reduce"
    """Payloads are summed element-wise: dense payloads, or sparse ones on indices shared by all ranks."""
    ALL_GATHER = "all_gather"
    """Every rank receives every rank's payload, all of the same length (fixed-size sparse, quantized)."""
    ALL_GATHER_V = "all_gather_v"
    """Like ``ALL_GATHER`` but lengths differ per rank: lengths are exchanged first, payloads padded."""


@dataclass(slots=True)
class Payload:
    """What one rank hands to the collective: one flat ``tensor``, plus ``meta`` that never travels.

    ``meta`` holds local bookkeeping that decompression needs (the selected indices of a sparse
    payload, say); anything another rank must know to decompress goes in ``tensor``.
    """

    tensor: torch.Tensor
    meta: Any = None


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (seed, bucket, rank...), stable across processes and runs."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class BucketState:
    """The mutable state of one gradient bucket: layout, step, generators, the compressor's data.

    ``generator`` is private to this rank (seeded from seed, bucket and rank: QSGD's stochastic
    rounding must differ between ranks). ``shared_generator`` is seeded from seed and bucket
    only and advanced identically everywhere, so ranks draw the same random indices (random-k)
    or the same initial factors (PowerSGD), as PyTorch's ``PowerSGDState`` does.
    """

    __slots__ = (
        "data", "generator", "index", "numel", "rank", "scratch", "shapes", "shared_generator", "step",
        "world_size",
    )  # fmt: skip

    def __init__(
        self, *, index: int, shapes: tuple[torch.Size, ...], rank: int, world_size: int, seed: int
    ) -> None:
        self.index = index
        self.shapes = shapes
        self.numel = sum(int(torch.Size(s).numel()) for s in shapes)
        self.rank = rank
        self.world_size = world_size
        self.step = 0
        self.generator = torch.Generator().manual_seed(derive_seed(seed, index, "rank", rank))
        self.shared_generator = torch.Generator().manual_seed(derive_seed(seed, index, "shared"))
        self.data: dict[str, Any] = {}
        self.scratch: dict[str, torch.Tensor] = {}

    def buffer(self, name: str, numel: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A persistent work tensor of this bucket (``numel`` defaults to the bucket's size).

        Compressors reuse these instead of allocating every step: a fresh multi-megabyte tensor
        is fresh pages from the kernel, whose faults cost more than the arithmetic on them.
        Their contents are undefined on return and they are not part of any checkpoint.
        """
        size = self.numel if numel is None else numel
        tensor = self.scratch.get(name)
        if tensor is None or tensor.numel() != size or tensor.dtype != dtype:
            tensor = self.scratch[name] = torch.empty(size, dtype=dtype)
        return tensor

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The bucket's tensors as views into ``flat``, in bucket order and with their shapes."""
        out, offset = [], 0
        for shape in self.shapes:
            size = int(torch.Size(shape).numel())
            out.append(flat[offset : offset + size].view(shape))
            offset += size
        return out


def in_float32(
    out: torch.Tensor, bucket: BucketState, fill: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``out`` after ``fill`` wrote a float32 result: into ``out`` itself when it is float32, else
    into the bucket's ``dense`` work buffer, then cast into ``out`` (half-precision buckets)."""
    if out.dtype == torch.float32:
        return fill(out)
    return out.copy_(fill(bucket.buffer("dense")))


class Compressor(abc.ABC):
    """A gradient compressor: ``compress`` on every rank, a collective, ``decompress``/``aggregate``.

    Subclasses are keyword-only dataclasses of hyperparameters. They implement
    :meth:`compress` and :meth:`decompress`; set :attr:`collective`; override :meth:`residual`
    when the held-back part is cheaper to compute directly, :meth:`init_bucket` for per-bucket
    data, and :meth:`exchange` only for multi-round schemes (PowerSGD).

    Inputs are compensated by the memory and divided by the world size (see
    :meth:`Memory.compensate <dtune.comm.Memory.compensate>`), so the sum over ranks is the average.
    Any compressor is also a DDP communication hook provider::

        ddp.register_comm_hook(*compressor.ddp_hook())
        train.AllReduce(compression=compressor)
    """

    collective: ClassVar[Collective] = Collective.ALL_REDUCE

    @property
    def error_feedback(self) -> bool:
        """Whether this compressor wants an error-feedback memory by default."""
        return False

    def init_bucket(self, bucket: BucketState) -> None:  # noqa: B027 (optional hook)
        """Fill ``bucket.data`` on the first call for a bucket (or when its layout changes)."""

    @abc.abstractmethod
    def compress(self, tensor: torch.Tensor, bucket: BucketState) -> Payload:
        """The payload for ``tensor`` (the flat, compensated bucket); it must not alias ``tensor``."""

    @abc.abstractmethod
    def decompress(self, payload: Payload, bucket: BucketState, out: torch.Tensor) -> torch.Tensor:
        """Write the dense tensor that ``payload`` stands for into ``out`` and return it.

        After an all-reduce, ``payload.tensor`` holds the sum over ranks; after an all-gather,
        one rank's payload.
        """

    def aggregate(self, payloads: list[Payload], bucket: BucketState, out: torch.Tensor) -> torch.Tensor:
        """Sum the dense tensors of every rank's payload (all-gather compressors) into ``out``."""
        out.zero_()
        scratch = bucket.buffer("aggregate", out.numel(), out.dtype)
        for payload in payloads:
            out.add_(self.decompress(payload, bucket, scratch))
        return out

    def residual(self, tensor: torch.Tensor, payload: Payload, bucket: BucketState) -> torch.Tensor:
        """What this rank held back: ``tensor`` minus the dense tensor its own payload stands for.

        ``tensor`` is the compensated bucket, which the memory owns: it may be turned into the
        residual in place (the sparsifiers zero what they sent), saving a pass over the bucket.
        """
        sent = self.decompress(payload, bucket, bucket.buffer("sent", tensor.numel(), tensor.dtype))
        return tensor.sub_(sent)

    def compress_undivided(self, tensor: torch.Tensor, bucket: BucketState) -> Payload:
        """The payload of ``tensor / bucket.world_size``, for a memory that only divides.

        The default divides ``tensor`` (the bucket) in place and calls :meth:`compress`;
        compressors whose first pass can absorb the division override this and save a pass
        over the bucket (QSGD divides its chunk norms instead).
        """
        if bucket.world_size > 1:
            tensor.div_(bucket.world_size)
        return self.compress(tensor, bucket)

    def exchange(
        self, tensor: torch.Tensor, bucket: BucketState, comm: Communicator, memory: Memory
    ) -> torch.futures.Future[torch.Tensor]:
        """One round: compensate, compress, keep the residual, collective, decompress into ``tensor``."""
        with comm.accounting.timed():
            if memory.divides_only:
                payload = self.compress_undivided(tensor, bucket)
            else:
                compensated = memory.compensate(tensor, bucket)
                payload = self.compress(compensated, bucket)
                if memory.keeps_residual:
                    memory.update(self.residual(compensated, payload, bucket), bucket)
        if self.collective is Collective.ALL_REDUCE:
            meta = payload.meta

            def reduced(summed: torch.Tensor) -> torch.Tensor:
                with comm.accounting.timed():
                    return self.decompress(Payload(summed, meta), bucket, tensor)

            return comm.all_reduce(payload.tensor, bucket).then(lambda fut: reduced(fut.value()))

        def gathered(tensors: list[torch.Tensor]) -> torch.Tensor:
            with comm.accounting.timed():
                return self.aggregate([Payload(t, payload.meta) for t in tensors], bucket, tensor)

        variable = self.collective is Collective.ALL_GATHER_V
        return comm.all_gather(payload.tensor, bucket, variable=variable).then(
            lambda fut: gathered(fut.value())
        )

    def __getstate__(self) -> dict[str, Any]:
        # hyperparameters travel (to worker processes, in configs); the live state does not
        return {k: v for k, v in self.__dict__.items() if k != "_state"}

    # -- the CommHookProvider protocol of dtune.train.AllReduce --------------------------------

    def ddp_hook(self) -> tuple[CommState, Any]:
        """``(state, hook)`` for ``DistributedDataParallel.register_comm_hook``."""
        from dtune.comm._hook import ddp_hook

        return ddp_hook(self)

    def stats(self) -> dict[str, float]:
        """Accounting of the newest state made from this compressor (zeros before any).

        Example: ``dtune.report({"loss": loss, **compressor.stats()})``.
        """
        from dtune.comm._stats import Accounting

        state = getattr(self, "_state", None)
        return (state.accounting if state is not None else Accounting()).as_dict()


def check_ratio(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}.")
    if not 0 < value <= 1:
        raise ValueError(f"The value of `{name}` is {value!r}, but must be in (0, 1].")


def check_int(name: str, value: int, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an integer, got {type(value).__name__}.")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"The value of `{name}` is {value!r}, but must be {bound}.")


def check_enum(name: str, value: object, kind: type[enum.Enum]) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"`{name}` must be a {kind.__name__}, got {value!r}.")


def selected_count(numel: int, ratio: float) -> int:
    """How many of ``numel`` entries a sparsifier with ``ratio`` keeps: at least one."""
    return max(1, min(numel, round(numel * ratio)))
