"""Random-k sparsification with error feedback, on indices every rank draws alike.

Each step sends a random ``ratio`` fraction of the entries and keeps the rest as error feedback
(Stich et al., "Sparsified SGD with Memory", NeurIPS 2018). The indices come from the bucket's
*shared* generator, seeded and advanced identically on every rank, so all ranks pick the same
entries: only values travel, and they are summed by an all-reduce (the property GRACE notes
makes random-k, unlike top-k, all-reduce compatible). No index is sent and no sort is needed,
which makes it the cheapest sparsifier to compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dtune.comm._base import BucketState, Collective, Compressor, Payload, check_ratio, selected_count

__all__ = ["RandomK"]


@dataclass(frozen=True, kw_only=True)
class RandomK(Compressor):
    """Send the same random ``ratio`` fraction of entries on every rank; error feedback on.

    Below a ratio of 1/8, indices are drawn with replacement and de-duplicated (a sort of k
    numbers instead of a permutation of the whole bucket), so slightly fewer than k distinct
    entries are sent (about ``k * (1 - ratio / 2)``); above it, exactly k by a permutation.

    Example:
        >>> import torch
        >>> from dtune import comm
        >>> state = comm.CommState(comm.RandomK(ratio=1.0))  # lossless
        >>> g = [torch.tensor([1.0, 2.0, 3.0])]
        >>> state.all_reduce(g)
        >>> g[0].tolist()
        [1.0, 2.0, 3.0]
    """

    ratio: float = 0.01
    collective: ClassVar[Collective] = Collective.ALL_REDUCE

    def __post_init__(self) -> None:
        check_ratio("ratio", self.ratio)

    @property
    def error_feedback(self) -> bool:
        return True

    def indices(self, bucket: BucketState) -> torch.Tensor:
        """This step's indices; every rank gets the same ones (the shared generator)."""
        numel = bucket.numel
        k = selected_count(numel, self.ratio)
        if k == numel:
            return torch.arange(numel)
        if 8 * k >= numel:
            return torch.randperm(numel, generator=bucket.shared_generator)[:k]
        drawn = torch.randint(0, numel, (k,), generator=bucket.shared_generator)
        unique: torch.Tensor = torch.unique(drawn)  # sorted too, so the gathers are cache-friendly
        return unique

    # index_select / index_copy_ / index_fill_: tensor[indices] without advanced indexing's set-up
    def compress(self, tensor: torch.Tensor, bucket: BucketState) -> Payload:
        indices = self.indices(bucket)
        return Payload(tensor.index_select(0, indices), meta=indices)

    def decompress(self, payload: Payload, bucket: BucketState, out: torch.Tensor) -> torch.Tensor:
        out.zero_()
        return out.index_copy_(0, payload.meta, payload.tensor)

    def residual(self, tensor: torch.Tensor, payload: Payload, bucket: BucketState) -> torch.Tensor:
        return tensor.index_fill_(0, payload.meta, 0)  # in place: the compensated bucket is the memory's
