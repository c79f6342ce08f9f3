"""Dynamic communication thresholding (DCT-DP): top-k's threshold, recomputed only every L steps.

Gupta et al., "Training Recommender Systems at Scale: Communication-Efficient Model and Data
Parallelism" (KDD 2021, arXiv 2010.08899). Every ``refresh_every`` steps a rank computes the
threshold as the k-th largest magnitude of its compensated gradient ``|g + e|`` (an exact
selection by linear-time introselect, amortized over L steps); on the other steps it sends
every entry whose magnitude is at least that threshold, which is one comparison and no sort.
What is not sent stays as error feedback. The number of entries sent drifts between refreshes
and differs between ranks, so payloads are all-gathered with their lengths
(``Collective.ALL_GATHER_V``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dtune.comm._base import BucketState, Collective, check_int, check_ratio, selected_count
from dtune.comm._sparse import SparseCompressor, as_numpy, at_least, kth_largest

__all__ = ["Threshold"]


@dataclass(frozen=True, kw_only=True)
class Threshold(SparseCompressor):
    """Send entries with ``|g + e| >=`` a threshold refreshed every ``refresh_every`` steps.

    At a refresh the threshold is set so that the ``ratio`` fraction of largest magnitudes
    pass. ``bucket.data["threshold"]`` and ``["sent"]`` (entries sent at the last step) show
    what it does.

    Example:
        >>> import torch
        >>> from dtune import comm
        >>> state = comm.CommState(comm.Threshold(ratio=0.5, refresh_every=100))
        >>> g = [torch.tensor([0.1, -3.0, 2.0, 0.2])]
        >>> state.all_reduce(g)  # refresh: threshold 2.0
        >>> g[0].tolist()
        [0.0, -3.0, 2.0, 0.0]
    """

    ratio: float = 0.01
    refresh_every: int = 100
    collective: ClassVar[Collective] = Collective.ALL_GATHER_V

    def __post_init__(self) -> None:
        check_ratio("ratio", self.ratio)
        check_int("refresh_every", self.refresh_every, 1)

    @property
    def error_feedback(self) -> bool:
        return True

    def init_bucket(self, bucket: BucketState) -> None:
        bucket.data.update(threshold=None, refreshed_at=-1, sent=0)

    def select(self, tensor: torch.Tensor, bucket: BucketState) -> torch.Tensor:
        magnitude = torch.abs(tensor, out=bucket.buffer("magnitude", tensor.numel(), tensor.dtype))
        data = bucket.data
        if data["threshold"] is None or bucket.step - data["refreshed_at"] >= self.refresh_every:
            k = selected_count(tensor.numel(), self.ratio)
            data["threshold"] = kth_largest(as_numpy(magnitude), k, bucket)
            data["refreshed_at"] = bucket.step
        indices = at_least(magnitude, data["threshold"], bucket.buffer("mask", tensor.numel(), torch.bool))
        data["sent"] = int(indices.numel())
        return indices
