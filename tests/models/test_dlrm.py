"""The DLRM-style CTR model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dtune.data import SyntheticCTR, normalized_entropy
from dtune.models import DLRM


def _model(**kwargs):
    return DLRM(vocab_sizes=[5, 7, 11], dense_features=4, embedding_dim=3, bottom=(6,), top=(5,), **kwargs)


def _hand_written(model, dense, pooled):
    bottom = model.bottom(dense)
    vectors = [bottom, *pooled]
    pairs = [
        (vectors[i] * vectors[j]).sum(1) for i in range(len(vectors)) for j in range(i + 1, len(vectors))
    ]
    return model.top(torch.cat([bottom, torch.stack(pairs, 1)], 1)).squeeze(1)


def test_forward_matches_a_hand_written_dlrm():
    model = _model()
    dense, sparse = torch.randn(2, 4), torch.tensor([[1, 6, 10], [4, 0, 3]])
    pooled = [model.table(f)[sparse[:, f]] for f in range(3)]  # each feature from its own table
    torch.testing.assert_close(model(dense, sparse), _hand_written(model, dense, pooled))
    assert [model.table(f).shape[0] for f in range(3)] == [5, 7, 11]


def test_bags_sum_the_rows_of_their_ids():
    model = _model()
    dense, bags = torch.randn(2, 4), torch.tensor([[[1, 2], [3, 3], [0, 9]], [[4, 4], [6, 0], [10, 1]]])
    pooled = [model.table(f)[bags[:, f, 0]] + model.table(f)[bags[:, f, 1]] for f in range(3)]
    torch.testing.assert_close(model(dense, bags), _hand_written(model, dense, pooled))


def test_gradients_of_the_tables_are_sparse_rows():
    model = _model()
    model(torch.randn(3, 4), torch.tensor([[1, 2, 3], [1, 5, 3], [0, 2, 4]])).sum().backward()
    grad = model.embeddings.weight.grad
    assert grad.is_sparse
    touched = set(grad.coalesce().indices()[0].tolist())
    assert touched == {1, 0, 5 + 2, 5 + 5, 12 + 3, 12 + 4}


def test_initialisation_is_owned():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b = _model(seed=4), _model(seed=4)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator was not touched
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not torch.equal(_model(seed=5).top[0].weight, a.top[0].weight)


@pytest.fixture
def one_thread():
    """Train in one intra-op thread (as the workers do): two threads on a busy 2-core host crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_one_pass_training_learns_most_of_what_the_teacher_knows(one_thread):
    task = SyntheticCTR(vocab_sizes=[100, 300, 1000], dense_features=4, seed=0)
    data, held_out = task.sample(12_000, seed=1), task.sample(5_000, seed=2)
    model = DLRM(
        vocab_sizes=task.vocab_sizes, dense_features=4, embedding_dim=8, bottom=(16,), top=(16,), seed=0
    )
    dense = [p for n, p in model.named_parameters() if n != "embeddings.weight"]
    optimizer = torch.optim.Adagrad(dense, lr=0.05)
    tables = torch.optim.SGD([model.embeddings.weight], lr=10.0)
    for batch in data.batches(128):
        optimizer.zero_grad()
        tables.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(
            model(batch.dense, batch.sparse), batch.labels
        ).backward()
        optimizer.step()
        tables.step()
    with torch.no_grad():
        ne = normalized_entropy(torch.sigmoid(model(held_out.dense, held_out.sparse)), held_out.labels)
    best = normalized_entropy(task.click_probability(held_out.dense, held_out.sparse), held_out.labels)
    assert best < ne < 0.96  # well below the base rate's 1.0, above the teacher itself


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="`embedding_dim` is 0"):
        DLRM(vocab_sizes=[3], embedding_dim=0)
    with pytest.raises(ValueError, match="`sparse` has 2 features, but the model has 3"):
        _model()(torch.randn(1, 4), torch.zeros(1, 2, dtype=torch.long))
