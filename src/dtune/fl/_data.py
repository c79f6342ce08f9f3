"""Federated tasks: a labelled data set split across clients with non-IID (Dirichlet) label skew.

Each class is divided among the clients in proportions drawn from a symmetric Dirichlet(alpha):
small ``alpha`` gives each client a few dominant classes, which is what makes federated training
slow and client selection matter. Data never leaves the process: no downloads.

Reference: Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification", arXiv 1909.06335 (the Dirichlet split).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

__all__ = ["FederatedTask", "TaskConfig", "TaskKind", "dirichlet_partition", "make_task"]


class TaskKind(enum.Enum):
    """Which data set to split."""

    DIGITS = "digits"  # scikit-learn's 1,797 8x8 handwritten digits, 10 classes
    SYNTHETIC = "synthetic"  # make_classification, any number of clients


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """How to build a federated task.

    Example:
        >>> task = make_task(TaskConfig(num_clients=20), seed=0)
        >>> task.num_clients, task.num_classes
        (20, 10)
    """

    kind: TaskKind = TaskKind.DIGITS
    num_clients: int = 100
    alpha: float = 0.3
    min_samples: int = 2
    test_fraction: float = 0.2
    samples_per_client: int = 40  # SYNTHETIC only: training samples per client on average
    num_features: int = 32  # SYNTHETIC only

    def __post_init__(self) -> None:
        if not isinstance(self.kind, TaskKind):
            raise TypeError(f"The value of `kind` is {self.kind!r}, but must be a dtune.fl.TaskKind.")
        for name in ("num_clients", "min_samples", "samples_per_client", "num_features"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"The value of `{name}` is {value!r}, but must be an integer >= 1.")
        if not self.alpha > 0:
            raise ValueError(f"The value of `alpha` is {self.alpha!r}, but must be > 0.")
        if not 0 < self.test_fraction < 1:
            raise ValueError(
                f"The value of `test_fraction` is {self.test_fraction!r}, but must be in (0, 1)."
            )


@dataclass(frozen=True, eq=False)
class FederatedTask:
    """Training data grouped by client (client ``i`` owns rows ``offsets[i]:offsets[i+1]``) and a
    held-out test set for the server's evaluation."""

    x_train: np.ndarray
    y_train: np.ndarray
    offsets: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def num_clients(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def sizes(self) -> np.ndarray:
        """Training examples per client."""
        return np.diff(self.offsets)


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator, min_samples: int = 1
) -> list[np.ndarray]:
    """Split example indices among clients, each class in Dirichlet(alpha) proportions.

    Clients left with fewer than ``min_samples`` examples are topped up with random examples
    taken from the largest clients, so that every client can train.
    """
    if len(labels) < num_clients * min_samples:
        raise ValueError(
            f"The value of `num_clients` is {num_clients}, but must be <= {len(labels) // min_samples} "
            f"so that each client gets min_samples={min_samples} of the {len(labels)} examples."
        )
    owner = np.empty(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for client, part in enumerate(np.split(members, cuts)):
            owner[part] = client
    counts = np.bincount(owner, minlength=num_clients)
    for client in np.flatnonzero(counts < min_samples).tolist():
        while counts[client] < min_samples:
            donor = int(np.argmax(counts))
            moved = rng.choice(np.flatnonzero(owner == donor))
            owner[moved] = client
            counts[donor] -= 1
            counts[client] += 1
    return [np.flatnonzero(owner == client) for client in range(num_clients)]


def _load(config: TaskConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if config.kind is TaskKind.DIGITS:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        return x.astype(np.float64), y.astype(np.int64)
    from sklearn.datasets import make_classification

    total = int(np.ceil(config.num_clients * config.samples_per_client / (1 - config.test_fraction)))
    x, y = make_classification(
        n_samples=total, n_features=config.num_features, n_informative=max(2, config.num_features // 2),
        n_redundant=config.num_features // 8, n_classes=10, n_clusters_per_class=2, class_sep=1.0,
        flip_y=0.02, random_state=seed,
    )  # fmt: skip
    return x, y.astype(np.int64)


def make_task(config: TaskConfig, seed: int) -> FederatedTask:
    """Load or generate the data, hold out a stratified test set, split the rest among clients."""
    rng = np.random.default_rng(seed)
    x, y = _load(config, seed)
    test = np.concatenate(
        [members[: round(config.test_fraction * len(members))]
         for members in (rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y))]
    )  # fmt: skip
    train = np.setdiff1d(np.arange(len(y)), test)
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    x = ((x - mean) / std).astype(np.float32)
    parts = dirichlet_partition(y[train], config.num_clients, config.alpha, rng, config.min_samples)
    order = np.concatenate(parts)
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])])
    return FederatedTask(
        x_train=x[train][order], y_train=y[train][order], offsets=offsets,
        x_test=x[test], y_test=y[test], num_classes=int(y.max()) + 1,
    )  # fmt: skip
