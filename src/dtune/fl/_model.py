"""A small classifier trained for many clients at once: the local-training step of a round.

Parameters are one flat vector (what the aggregators see); a round's local training stacks the K
participants' copies into ``(K, P)`` and runs their minibatch SGD side by side with batched
matrix products, so ten or a thousand clients cost a few numpy calls per step, not a loop.
The model is softmax regression (``hidden=0``) or a one-hidden-layer ReLU MLP.

Reference: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017 (FedAvg: local SGD steps, then the server averages the updates).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dtune.fl._data import FederatedTask

__all__ = ["LocalResult", "ModelConfig", "VectorModel"]


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Model shape and local training.

    Args:
        hidden: width of the hidden layer; 0 for softmax regression.
        lr: client learning rate.
        local_steps: SGD steps per round on each client.
        batch_size: examples per step (drawn with replacement from the client's data).
    """

    hidden: int = 0
    lr: float = 0.05
    local_steps: int = 20
    batch_size: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.hidden, int) or self.hidden < 0:
            raise ValueError(f"The value of `hidden` is {self.hidden!r}, but must be an integer >= 0.")
        for name in ("local_steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"The value of `{name}` is {value!r}, but must be an integer >= 1.")
        if not self.lr > 0:
            raise ValueError(f"The value of `lr` is {self.lr!r}, but must be > 0.")

    @property
    def samples_per_round(self) -> int:
        """The work of one round on a client (FedScale: local steps times batch size)."""
        return self.local_steps * self.batch_size


@dataclass(frozen=True)
class LocalResult:
    """Updates ``(K, P)`` (new minus global parameters) and Oort's statistical utility per client."""

    updates: np.ndarray
    utility: np.ndarray


class VectorModel:
    """Flat-parameter classifier with batched local training.

    Example:
        >>> from dtune.fl import TaskConfig, make_task
        >>> task = make_task(TaskConfig(num_clients=10), seed=0)
        >>> model = VectorModel(task.num_features, task.num_classes, ModelConfig())
        >>> theta = model.init(np.random.default_rng(0))
        >>> result = model.local_train(theta, task, np.arange(3), np.random.default_rng(0))
        >>> result.updates.shape == (3, model.size)
        True
    """

    def __init__(self, num_features: int, num_classes: int, config: ModelConfig | None = None) -> None:
        self.config = config or ModelConfig()
        self.num_features, self.num_classes = num_features, num_classes
        h = self.config.hidden
        if h:
            self._shapes = [(num_features, h), (h,), (h, num_classes), (num_classes,)]
        else:
            self._shapes = [(num_features, num_classes), (num_classes,)]
        self._sizes = [int(np.prod(s)) for s in self._shapes]
        self.size = int(sum(self._sizes))

    def init(self, rng: np.random.Generator) -> np.ndarray:
        """Initial parameters: zeros for softmax regression, He-scaled weights for the MLP."""
        if not self.config.hidden:
            return np.zeros(self.size)
        parts = [
            rng.standard_normal(s) * np.sqrt(2.0 / s[0]) if len(s) == 2 else np.zeros(s) for s in self._shapes
        ]
        return np.concatenate([p.ravel() for p in parts])

    def _unpack(self, theta: np.ndarray) -> list[np.ndarray]:
        """Views ``(K, *shape)`` of a ``(K, P)`` parameter stack."""
        out, start = [], 0
        for shape, size in zip(self._shapes, self._sizes, strict=True):
            out.append(theta[:, start : start + size].reshape((len(theta), *shape)))
            start += size
        return out

    def _forward(self, params: list[np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if self.config.hidden:
            w1, b1, w2, b2 = params
            hidden = np.maximum(np.matmul(x, w1) + b1[:, None, :], 0.0)
            return np.matmul(hidden, w2) + b2[:, None, :], hidden
        w, b = params
        return np.matmul(x, w) + b[:, None, :], None

    def _gradients(
        self, params: list[np.ndarray], x: np.ndarray, y: np.ndarray
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """Mean cross-entropy gradients per client, and per-example losses ``(K, B)``."""
        logits, hidden = self._forward(params, x)
        logits = logits - logits.max(axis=2, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=2, keepdims=True)
        k, b = y.shape
        picked = probs[np.arange(k)[:, None], np.arange(b)[None, :], y]
        losses = -np.log(np.maximum(picked, 1e-12))
        delta = probs
        delta[np.arange(k)[:, None], np.arange(b)[None, :], y] -= 1.0
        delta /= b
        if hidden is None:
            return [np.matmul(x.transpose(0, 2, 1), delta), delta.sum(axis=1)], losses
        _w1, _, w2, _ = params
        back = np.matmul(delta, w2.transpose(0, 2, 1)) * (hidden > 0)
        grads = [np.matmul(x.transpose(0, 2, 1), back), back.sum(axis=1),
                 np.matmul(hidden.transpose(0, 2, 1), delta), delta.sum(axis=1)]  # fmt: skip
        return grads, losses

    def local_train(
        self,
        theta: np.ndarray,
        task: FederatedTask,
        clients: np.ndarray,
        rng: np.random.Generator,
        flip_labels: np.ndarray | None = None,
    ) -> LocalResult:
        """Run ``local_steps`` of SGD from ``theta`` on each client's own data, side by side.

        ``flip_labels[i]`` makes client ``i`` train on flipped labels ``C - 1 - y`` (an attack).
        Utility is Oort's ``|B_i| * sqrt(mean(loss^2))`` over the examples the client trained on.
        """
        clients = np.asarray(clients, dtype=np.int64)
        k = len(clients)
        stack = np.repeat(theta[None, :].astype(np.float64), k, axis=0)
        params = self._unpack(stack)
        low, sizes = task.offsets[clients], task.sizes[clients]
        squared = np.zeros(k)
        for _ in range(self.config.local_steps):
            draws = rng.random((k, self.config.batch_size))
            index = low[:, None] + np.minimum((draws * sizes[:, None]).astype(np.int64), sizes[:, None] - 1)
            x, y = task.x_train[index], task.y_train[index]
            if flip_labels is not None and flip_labels.any():
                y = np.where(flip_labels[:, None], self.num_classes - 1 - y, y)
            grads, losses = self._gradients(params, x, y)
            for p, g in zip(params, grads, strict=True):
                p -= self.config.lr * g  # views into `stack`
            squared += (losses**2).mean(axis=1)
        utility = sizes * np.sqrt(squared / self.config.local_steps)
        return LocalResult(updates=stack - theta[None, :], utility=utility)

    def evaluate(self, theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """Accuracy and mean cross-entropy of parameters ``theta`` on ``(x, y)``."""
        logits, _ = self._forward(self._unpack(theta[None, :]), x[None])
        logits = logits[0] - logits[0].max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        accuracy = float((logits.argmax(axis=1) == y).mean())
        return accuracy, float(-log_probs[np.arange(len(y)), y].mean())
