"""Synthetic CTR data and the CTR metrics (NE, AUC)."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from dtune.data import SyntheticCTR, auc, normalized_entropy


@pytest.fixture(scope="module")
def task():
    return SyntheticCTR(seed=0)


def test_base_rate_vocabularies_and_shapes(task):
    data = task.sample(60_000, seed=1)
    assert data.dense.shape == (60_000, 13) and data.sparse.shape == (60_000, 8)
    assert 0.03 <= float(data.labels.mean()) <= 0.05  # the 3-5% base rate
    assert min(task.vocab_sizes) == 1_000 and max(task.vocab_sizes) == 100_000
    for f, size in enumerate(task.vocab_sizes):
        assert int(data.sparse[:, f].min()) >= 0 and int(data.sparse[:, f].max()) < size


def test_ids_follow_a_zipf_law(task):
    ids = task.sample(60_000, seed=1).sparse[:, 4]  # the 1e5 vocabulary
    counts = torch.bincount(ids, minlength=100_000).sort(descending=True).values.double()
    # log-count against log-rank falls with slope about -s (s = 1.1) over the head of the law
    ranks = torch.arange(1, 101, dtype=torch.float64)
    slope = torch.linalg.lstsq(
        torch.stack([ranks.log(), torch.ones(100, dtype=torch.float64)], 1), counts[:100].log().unsqueeze(1)
    ).solution[0, 0]
    assert -1.35 < float(slope) < -0.85
    assert int((counts > 0).sum()) < 40_000  # most of a large vocabulary is rare or unseen


def test_samples_are_reproducible_and_seeds_differ(task):
    a, b, c = task.sample(500, seed=3), task.sample(500, seed=3), task.sample(500, seed=4)
    assert torch.equal(a.sparse, b.sparse) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.sparse, c.sparse)
    again = SyntheticCTR(seed=0).sample(500, seed=3)  # the teacher is fixed by the task's seed
    assert torch.equal(again.labels, a.labels)
    assert not torch.equal(SyntheticCTR(seed=1).sample(500, seed=3).sparse, a.sparse)


def test_the_teacher_is_learnable_signal(task):
    data = task.sample(50_000, seed=5)
    p = task.click_probability(data.dense, data.sparse)
    assert normalized_entropy(p, data.labels) < 0.85 and auc(p, data.labels) > 0.8


def test_batches_and_shards_cover_one_pass(task):
    data = task.sample(1_000, seed=1)
    sizes = [len(b) for b in data.batches(300)]
    assert sizes == [300, 300, 300, 100]
    halves = [data.shard(i, 2) for i in range(2)]
    assert torch.equal(torch.cat([h.sparse for h in halves]), data.sparse)
    with pytest.raises(ValueError, match="`index` is 2"):
        data.shard(2, 2)


def test_auc_matches_sklearn_with_ties():
    gen = torch.Generator().manual_seed(0)
    labels = torch.bernoulli(torch.full((3000,), 0.1), generator=gen)
    scores = torch.randint(0, 50, (3000,), generator=gen).float() + 3 * labels  # many ties
    assert auc(scores, labels) == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12)


def test_normalized_entropy_is_log_loss_over_base_entropy():
    gen = torch.Generator().manual_seed(1)
    labels = torch.bernoulli(torch.full((2000,), 0.05), generator=gen)
    p = torch.rand(2000, generator=gen) * 0.2
    rate = float(labels.mean())
    entropy = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    expected = log_loss(labels.numpy(), p.numpy()) / entropy
    assert normalized_entropy(p, labels) == pytest.approx(expected, rel=1e-6)  # sklearn: float32
    assert normalized_entropy(torch.full((2000,), rate), labels) == pytest.approx(1.0)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="both classes"):
        auc(torch.rand(4), torch.zeros(4))
    with pytest.raises(ValueError, match="0 or 1"):
        normalized_entropy(torch.rand(3), torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="`base_rate` is 0.0"):
        normalized_entropy(torch.rand(3), torch.zeros(3))
    with pytest.raises(ValueError, match="`base_rate` is 1.5, but must be in"):
        SyntheticCTR(base_rate=1.5)
    with pytest.raises(ValueError, match="`vocab_sizes` holds 1"):
        SyntheticCTR(vocab_sizes=[10, 1])
