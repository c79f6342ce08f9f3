"""Synthetic click-through-rate data: Zipf-distributed categorical ids, dense features, and
labels drawn from a hidden teacher with a low base rate.

The shape follows the public CTR benchmarks (Criteo: 13 dense and 26 categorical features, a
few percent positives) and the workload of ShadowSync (Zheng et al., "ShadowSync: Performing
Synchronization in the Background for Highly Scalable Distributed Training", arXiv 2003.03477):
one-pass training, where each example is seen once. Ids follow a Zipf law over vocabularies of
1e3 to 1e5, so a few ids are frequent and most are rare, as in real logs. The teacher is a
logistic model over the dense features, one weight per id and pairwise dot products of
per-id factors (a factorisation machine), with its intercept solved so that the mean click
probability is ``base_rate``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

__all__ = ["CTRBatch", "SyntheticCTR"]

_CALIBRATION_SIZE = 50_000


@dataclass(frozen=True)
class CTRBatch:
    """Examples: ``dense`` (N, D) float32, ``sparse`` (N, F) int64 ids, ``labels`` (N,) float32."""

    dense: torch.Tensor
    sparse: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: slice | torch.Tensor) -> CTRBatch:
        return CTRBatch(self.dense[index], self.sparse[index], self.labels[index])

    def batches(self, batch_size: int) -> Iterator[CTRBatch]:
        """Consecutive batches of ``batch_size`` (the last one may be smaller): one pass."""
        if batch_size < 1:
            raise ValueError(f"The value of `batch_size` is {batch_size}, but must be >= 1.")
        for start in range(0, len(self), batch_size):
            yield self[start : start + batch_size]

    def shard(self, index: int, count: int) -> CTRBatch:
        """Contiguous part ``index`` of ``count`` equal parts (trainer ``index`` of ``count``)."""
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"The value of `index` is {index}, but must be in [0, {count}).")
        size = len(self) // count
        return self[index * size : (index + 1) * size]


class SyntheticCTR:
    """A reproducible CTR task: the teacher is fixed by ``seed``; every sample by its own seed.

    Example:
        >>> from dtune.data import SyntheticCTR
        >>> task = SyntheticCTR(vocab_sizes=[1000, 5000], dense_features=4, seed=0)
        >>> train = task.sample(10_000, seed=1)
        >>> train.sparse.shape, train.dense.shape
        (torch.Size([10000, 2]), torch.Size([10000, 4]))
        >>> 0.02 < float(train.labels.mean()) < 0.06
        True
    """

    def __init__(
        self,
        *,
        vocab_sizes: Sequence[int] = (1_000, 3_000, 10_000, 30_000, 100_000, 2_000, 20_000, 50_000),
        dense_features: int = 13,
        zipf_exponent: float = 1.1,
        base_rate: float = 0.04,
        factor_dim: int = 4,
        id_scale: float = 1.0,
        interaction_scale: float = 1.0,
        dense_scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        if len(vocab_sizes) < 1:
            raise ValueError("The value of `vocab_sizes` is empty, but must hold at least one size.")
        for size in vocab_sizes:
            if size < 2:
                raise ValueError(f"The value of `vocab_sizes` holds {size}, but every size must be >= 2.")
        if dense_features < 0:
            raise ValueError(f"The value of `dense_features` is {dense_features}, but must be >= 0.")
        if not zipf_exponent > 0:
            raise ValueError(f"The value of `zipf_exponent` is {zipf_exponent}, but must be > 0.")
        if not 0 < base_rate < 1:
            raise ValueError(f"The value of `base_rate` is {base_rate}, but must be in (0, 1).")
        if factor_dim < 1:
            raise ValueError(f"The value of `factor_dim` is {factor_dim}, but must be >= 1.")
        self.vocab_sizes = [int(v) for v in vocab_sizes]
        self.dense_features = dense_features
        self.zipf_exponent = zipf_exponent
        self.base_rate = base_rate
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        features = len(self.vocab_sizes)
        # Zipf over ranks, then a random rank -> id permutation per table, so that the frequent
        # ids are scattered over the table as hashed ids are.
        self._cdfs = []
        self._perms = []
        for size in self.vocab_sizes:
            weights = torch.arange(1, size + 1, dtype=torch.float64).pow(-zipf_exponent)
            cdf = weights.cumsum(0)
            self._cdfs.append(cdf / cdf[-1])
            self._perms.append(torch.randperm(size, generator=gen))
        self._dense_w = (
            torch.randn(dense_features, generator=gen) * dense_scale / math.sqrt(max(1, dense_features))
        )
        self._id_w = [
            torch.randn(v, generator=gen) * id_scale / math.sqrt(features) for v in self.vocab_sizes
        ]
        pairs = max(1, features * (features - 1) // 2)
        factor_std = (interaction_scale / math.sqrt(pairs)) ** 0.5 / factor_dim**0.25
        self._factors = [torch.randn(v, factor_dim, generator=gen) * factor_std for v in self.vocab_sizes]
        self._intercept = 0.0
        calibration = self._features(_CALIBRATION_SIZE, torch.Generator().manual_seed(seed + 7919))
        self._intercept = self._solve_intercept(self._logits(*calibration))

    def _features(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        dense = torch.randn(n, self.dense_features, generator=gen)
        columns = []
        for cdf, perm in zip(self._cdfs, self._perms, strict=True):
            ranks = torch.searchsorted(cdf, torch.rand(n, generator=gen, dtype=torch.float64))
            columns.append(perm[ranks.clamp_(max=len(perm) - 1)])
        return dense, torch.stack(columns, dim=1)

    def _logits(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        logits = dense @ self._dense_w + self._intercept
        factors = []
        for f, (weights, table) in enumerate(zip(self._id_w, self._factors, strict=True)):
            logits += weights[sparse[:, f]]
            factors.append(table[sparse[:, f]])
        stacked = torch.stack(factors, dim=1)  # (N, F, k)
        # sum over pairs f < g of <v_f, v_g> = (|sum v|^2 - sum |v|^2) / 2
        logits += 0.5 * (stacked.sum(1).pow(2).sum(1) - stacked.pow(2).sum((1, 2)))
        return logits

    def _solve_intercept(self, logits: torch.Tensor) -> float:
        low, high = -30.0, 30.0
        for _ in range(60):  # bisection: the mean probability is increasing in the intercept
            mid = (low + high) / 2
            if float(torch.sigmoid(logits + mid).mean()) < self.base_rate:
                low = mid
            else:
                high = mid
        return (low + high) / 2

    def click_probability(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """The teacher's click probability (the Bayes-optimal predictor) for each example."""
        return torch.sigmoid(self._logits(dense, sparse))

    def sample(self, n: int, *, seed: int) -> CTRBatch:
        """``n`` fresh examples; the same ``seed`` gives the same examples."""
        if n < 1:
            raise ValueError(f"The value of `n` is {n}, but must be >= 1.")
        gen = torch.Generator().manual_seed(seed)
        dense, sparse = self._features(n, gen)
        labels = torch.bernoulli(self.click_probability(dense, sparse), generator=gen)
        return CTRBatch(dense, sparse, labels.float())
