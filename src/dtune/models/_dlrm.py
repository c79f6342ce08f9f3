"""A DLRM-style click-through-rate model (Naumov et al., "Deep Learning Recommendation Model for
Personalization and Recommendation Systems", arXiv 1906.00091).

Dense features go through a bottom MLP to one vector of ``embedding_dim``; each categorical
feature is pooled from its own embedding table (an embedding bag: the sum of the rows of the
ids in that feature's bag); all pairwise dot products of these F + 1 vectors, with the bottom
output, feed a top MLP that returns one click logit per example.

The F tables are stored as row ranges of one ``nn.EmbeddingBag`` (table f holds rows
``offsets[f]:offsets[f + 1]``), as FBGEMM's table-batched embeddings do: one lookup, one kernel
and, under a parameter server, one request per step for all features. ``sparse_gradients``
makes its gradient a sparse tensor touching only the rows that were looked up.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["DLRM"]


def _mlp(sizes: Sequence[int], *, last_relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(fan_in, fan_out))
        if last_relu or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    """Embedding bags per categorical feature, bottom/top MLPs and dot interaction.

    ``forward(dense, sparse)`` takes ``dense`` (B, D) floats and ``sparse`` (B, F) ids (one id
    per feature) or (B, F, L) ids (bags of L ids, summed), ids counted from 0 in each feature's
    own vocabulary, and returns (B,) logits. Initialisation is fixed by ``seed`` and does not
    touch the global random state.

    Example:
        >>> import torch
        >>> from dtune.models import DLRM
        >>> model = DLRM(vocab_sizes=[100, 1000], dense_features=13, embedding_dim=8)
        >>> model(torch.randn(4, 13), torch.randint(0, 100, (4, 2))).shape
        torch.Size([4])
    """

    table_offsets: torch.Tensor
    _pair_rows: torch.Tensor
    _pair_cols: torch.Tensor

    def __init__(
        self,
        *,
        vocab_sizes: Sequence[int],
        dense_features: int = 13,
        embedding_dim: int = 16,
        bottom: Sequence[int] = (64,),
        top: Sequence[int] = (64, 32),
        sparse_gradients: bool = True,
        init_scale: float = 0.05,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if len(vocab_sizes) < 1:
            raise ValueError("The value of `vocab_sizes` is empty, but must hold at least one size.")
        if min(vocab_sizes) < 1:
            raise ValueError(f"The value of `vocab_sizes` holds {min(vocab_sizes)}, but sizes must be >= 1.")
        if dense_features < 1:
            raise ValueError(f"The value of `dense_features` is {dense_features}, but must be >= 1.")
        if embedding_dim < 1:
            raise ValueError(f"The value of `embedding_dim` is {embedding_dim}, but must be >= 1.")
        self.vocab_sizes = [int(v) for v in vocab_sizes]
        self.embedding_dim = embedding_dim
        features = len(self.vocab_sizes)
        offsets = torch.tensor([0, *self.vocab_sizes]).cumsum(0)
        self.register_buffer("table_offsets", offsets[:-1].clone(), persistent=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embeddings = nn.EmbeddingBag(
                int(offsets[-1]), embedding_dim, mode="sum", sparse=sparse_gradients
            )
            nn.init.uniform_(self.embeddings.weight, -init_scale, init_scale)
            self.bottom = _mlp([dense_features, *bottom, embedding_dim], last_relu=True)
            pairs = (features + 1) * features // 2
            self.top = _mlp([embedding_dim + pairs, *top, 1], last_relu=False)
        rows, cols = torch.triu_indices(features + 1, features + 1, offset=1)
        self.register_buffer("_pair_rows", rows, persistent=False)
        self.register_buffer("_pair_cols", cols, persistent=False)

    def table(self, feature: int) -> torch.Tensor:
        """Feature ``feature``'s embedding table: a (vocab, dim) view of the fused weight."""
        start = int(self.table_offsets[feature])
        return self.embeddings.weight[start : start + self.vocab_sizes[feature]]

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        batch, features = sparse.shape[0], sparse.shape[1]
        if features != len(self.vocab_sizes):
            raise ValueError(f"`sparse` has {features} features, but the model has {len(self.vocab_sizes)}.")
        ids = sparse if sparse.dim() == 3 else sparse.unsqueeze(2)
        ids = ids + self.table_offsets.view(1, -1, 1)
        bag = ids.shape[2]
        flat = ids.reshape(-1)
        offsets = torch.arange(0, flat.numel(), bag, device=flat.device)
        pooled: torch.Tensor = self.embeddings(flat, offsets).view(batch, features, self.embedding_dim)
        bottom: torch.Tensor = self.bottom(dense)
        vectors = torch.cat([bottom.unsqueeze(1), pooled], dim=1)  # (B, F + 1, d)
        gram = torch.bmm(vectors, vectors.transpose(1, 2))
        interactions = gram[:, self._pair_rows, self._pair_cols]
        logits: torch.Tensor = self.top(torch.cat([bottom, interactions], dim=1))
        return logits.squeeze(1)
