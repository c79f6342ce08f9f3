"""Federated data splits, the batched local training, and the attack models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dtune.fl import (
    Attack,
    AttackKind,
    Estimates,
    FederatedTask,
    ModelConfig,
    TaskConfig,
    TaskKind,
    VectorModel,
    dirichlet_partition,
    inflate_forecasts,
    make_task,
)


def test_dirichlet_partition_covers_every_example_once_and_skews_labels():
    labels = np.repeat(np.arange(10), 100)
    rng = np.random.default_rng(0)
    parts = dirichlet_partition(labels, 50, 0.1, rng, min_samples=3)
    everything = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(everything, np.arange(1000))
    assert min(len(p) for p in parts) >= 3

    def dominance(alpha):
        split = dirichlet_partition(labels, 50, alpha, np.random.default_rng(1))
        return np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in split if len(p)])

    assert dominance(0.1) > 0.6 > 0.3 > dominance(100.0)


def test_partition_refuses_more_clients_than_data():
    with pytest.raises(ValueError, match=r"The value of `num_clients` is 11, but must be <= 10"):
        dirichlet_partition(np.zeros(20, int), 11, 0.5, np.random.default_rng(0), min_samples=2)


@pytest.mark.parametrize("kind", [TaskKind.DIGITS, TaskKind.SYNTHETIC])
def test_tasks_are_deterministic_and_disjoint(kind):
    config = TaskConfig(kind=kind, num_clients=30)
    a, b = make_task(config, seed=5), make_task(config, seed=5)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    assert a.num_clients == 30 and a.sizes.min() >= config.min_samples
    assert len(a.x_test) > 0 and a.x_train.shape[1] == a.x_test.shape[1]
    assert not np.array_equal(make_task(config, seed=6).offsets, a.offsets)


def _torch_reference(model, theta, x, y):
    """The same model in torch, for a gradient parity check."""
    params = [torch.tensor(p[0], requires_grad=True) for p in model._unpack(theta[None, :].copy())]
    xt = torch.tensor(x)
    if len(params) == 4:
        logits = torch.relu(xt @ params[0] + params[1]) @ params[2] + params[3]
    else:
        logits = xt @ params[0] + params[1]
    torch.nn.functional.cross_entropy(logits, torch.tensor(y)).backward()
    return np.concatenate([p.grad.numpy().ravel() for p in params])


@pytest.mark.parametrize("hidden", [0, 8])
def test_batched_gradients_match_torch_autograd_per_client(hidden):
    rng = np.random.default_rng(0)
    model = VectorModel(5, 3, ModelConfig(hidden=hidden))
    theta = rng.normal(size=(2, model.size))
    x = rng.normal(size=(2, 7, 5))
    y = rng.integers(0, 3, size=(2, 7))
    grads, losses = model._gradients(model._unpack(theta.copy()), x, y)
    flat = np.concatenate([g.reshape(2, -1) for g in grads], axis=1)
    for k in range(2):
        np.testing.assert_allclose(
            flat[k], _torch_reference(model, theta[k], x[k], y[k]), rtol=1e-6, atol=1e-9
        )
    assert losses.shape == (2, 7)


def _one_client_task(x, y):
    return FederatedTask(
        x_train=x, y_train=y, offsets=np.array([0, len(y)]), x_test=x, y_test=y, num_classes=3
    )


def test_local_training_reduces_each_clients_loss_and_reports_oort_utility():
    task = make_task(TaskConfig(num_clients=10), seed=0)
    model = VectorModel(task.num_features, task.num_classes, ModelConfig(hidden=16, local_steps=30))
    theta = model.init(np.random.default_rng(0))
    clients = np.arange(4)
    result = model.local_train(theta, task, clients, np.random.default_rng(1))
    assert result.updates.shape == (4, model.size)
    for k, client in enumerate(clients):
        rows = slice(task.offsets[client], task.offsets[client + 1])
        before = model.evaluate(theta, task.x_train[rows], task.y_train[rows])[1]
        after = model.evaluate(theta + result.updates[k], task.x_train[rows], task.y_train[rows])[1]
        assert after < before
    # utility = |B_i| * sqrt(mean loss^2): at least |B_i| * mean loss, positive
    assert np.all(result.utility > 0)


def test_label_flip_trains_on_flipped_labels():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=20)
    model = VectorModel(4, 3, ModelConfig(local_steps=5, batch_size=4))
    theta = model.init(np.random.default_rng(0))
    flipped = model.local_train(
        theta, _one_client_task(x, y), np.array([0]), np.random.default_rng(7), flip_labels=np.array([True])
    )
    manual = model.local_train(theta, _one_client_task(x, 2 - y), np.array([0]), np.random.default_rng(7))
    np.testing.assert_allclose(flipped.updates, manual.updates)


def test_update_attacks_replace_only_the_attackers_rows():
    updates = np.arange(6.0).reshape(3, 2) + 1
    attackers = np.array([False, True, False])
    rng = np.random.default_rng(0)
    flip = Attack(kind=AttackKind.SIGN_FLIP, scale=2.0).corrupt(updates, attackers, rng)
    np.testing.assert_allclose(flip, [[1, 2], [-6, -8], [5, 6]])
    scaled = Attack(kind=AttackKind.SCALING).corrupt(updates, attackers, rng)
    np.testing.assert_allclose(scaled[1], [60, 80])
    noise = Attack(kind=AttackKind.NOISE, scale=3.0).corrupt(np.zeros((3, 20000)), attackers, rng)
    assert noise[1].std() == pytest.approx(3.0, rel=0.05) and not noise[[0, 2]].any()
    assert Attack(kind=AttackKind.LABEL_FLIP).corrupt(updates, attackers, rng).tolist() == updates.tolist()
    mask = Attack(kind=AttackKind.NOISE, per_round=2).choose(5, rng)
    assert mask.sum() == 2 and Attack(kind=AttackKind.NOISE, per_round=2).choose(1, rng).sum() == 1


def test_strategic_liars_claim_a_fast_certain_round():
    honest = Estimates(
        train_s=np.array([40.0, 5.0]), report_s=np.array([np.inf, 2.0]), p_available=np.array([0.2, 0.9])
    )
    sent = inflate_forecasts(honest, np.array([True, False]), deadline_s=40.0, factor=0.25)
    assert sent.train_s.tolist() == [5.0, 5.0] and sent.report_s.tolist() == [5.0, 2.0]
    assert sent.p_available.tolist() == [1.0, 0.9]
    with pytest.raises(ValueError, match=r"The value of `per_round` is -1"):
        Attack(kind=AttackKind.NOISE, per_round=-1)
