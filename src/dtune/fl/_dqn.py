"""A double DQN that picks k of n candidates, with a per-candidate factorised action space.

Choosing k of n clients has C(n, k) joint actions; like Prophet's agent (and slate/branching
Q-networks) we factorise: one shared network scores each candidate's state ``s_i`` for the two
actions skip/select, the agent selects the k candidates with the largest advantage
``Q(s_i, select) - Q(s_i, skip)``, and each candidate's transition is learnt separately. A
candidate's next state is its state the next time it is a candidate (a semi-MDP step); if it does
not come back within ``max_wait`` rounds the transition is stored as terminal.

Learning is standard double DQN: experience replay, a target network copied every
``target_sync`` gradient steps, the online network choosing the next action and the target
network evaluating it, Huber loss; exploration is epsilon-greedy per selection slot.

References: Mnih et al., "Playing Atari with Deep Reinforcement Learning", arXiv 1312.5602;
van Hasselt, Guez and Silver, "Deep Reinforcement Learning with Double Q-learning", AAAI 2016.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["DQNConfig", "DoubleDQN"]


@dataclass(frozen=True, kw_only=True)
class DQNConfig:
    """Network, learning and exploration of the agent.

    Args:
        hidden: units of the two hidden layers.
        lr: Adam learning rate.
        gamma: discount of a candidate's next state.
        batch_size: transitions per gradient step.
        replay_size: transitions kept.
        updates_per_round: gradient steps after each round's feedback.
        target_sync: gradient steps between copies of the online network to the target network.
        epsilon_start, epsilon_end, epsilon_rounds: epsilon decays linearly over the first
            ``epsilon_rounds`` rounds the agent plays (so a pre-trained agent explores little).
        max_wait: rounds a transition waits for its candidate to come back before it is terminal.
    """

    hidden: int = 32
    lr: float = 1e-3
    gamma: float = 0.3
    batch_size: int = 64
    replay_size: int = 5000
    updates_per_round: int = 4
    target_sync: int = 50
    epsilon_start: float = 0.5
    epsilon_end: float = 0.02
    epsilon_rounds: int = 40
    max_wait: int = 5

    def __post_init__(self) -> None:
        for name in ("hidden", "batch_size", "replay_size", "target_sync", "epsilon_rounds", "max_wait"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"The value of `{name}` is {value!r}, but must be an integer >= 1.")
        if not isinstance(self.updates_per_round, int) or self.updates_per_round < 0:
            raise ValueError(
                f"The value of `updates_per_round` is {self.updates_per_round!r}, "
                "but must be an integer >= 0."
            )
        if not self.lr > 0:
            raise ValueError(f"The value of `lr` is {self.lr!r}, but must be > 0.")
        if not 0 <= self.gamma < 1:
            raise ValueError(f"The value of `gamma` is {self.gamma!r}, but must be in [0, 1).")
        for name in ("epsilon_start", "epsilon_end"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"The value of `{name}` is {getattr(self, name)!r}, but must be in [0, 1].")


class DoubleDQN:
    """Factorised double DQN over candidate states of ``num_features`` features.

    Example:
        >>> agent = DoubleDQN(3, DQNConfig(), seed=0)
        >>> states = np.random.default_rng(0).random((10, 3))
        >>> chosen = agent.choose(states, k=2)
        >>> len(chosen), len(set(chosen.tolist()))
        (2, 2)
    """

    def __init__(self, num_features: int, config: DQNConfig | None = None, *, seed: int) -> None:
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"The value of `num_features` is {num_features!r}, but must be an integer >= 1.")
        self.config = config or DQNConfig()
        self.num_features = num_features
        self._rng = np.random.default_rng(seed)
        generator = torch.Generator().manual_seed(seed)
        h = self.config.hidden
        # nn.Linear's own init draws from torch's global RNG: fork it so that building an agent
        # leaves the caller's random state untouched, then initialise from the agent's generator
        with torch.random.fork_rng(devices=[]):
            self.online = nn.Sequential(
                nn.Linear(num_features, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 2)
            )
        with torch.no_grad():
            for p in self.online.parameters():
                bound = 1 / np.sqrt(p.shape[-1]) if p.dim() > 1 else 0.05
                p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound)
        self.target = copy.deepcopy(self.online)
        self._optimizer = torch.optim.Adam(self.online.parameters(), lr=self.config.lr)
        size = self.config.replay_size
        self._s = np.zeros((size, num_features), np.float32)
        self._s2 = np.zeros((size, num_features), np.float32)
        self._a = np.zeros(size, np.int64)
        self._r = np.zeros(size, np.float32)
        self._done = np.zeros(size, np.float32)
        self._count = 0
        self._steps = 0
        self.rounds_played = 0
        self.losses: list[float] = []

    def epsilon(self) -> float:
        """Exploration rate for the next round, from the rounds played so far."""
        c = self.config
        fraction = min(1.0, self.rounds_played / c.epsilon_rounds)
        return c.epsilon_start + fraction * (c.epsilon_end - c.epsilon_start)

    @torch.no_grad()
    def q_values(self, states: np.ndarray) -> np.ndarray:
        """``(n, 2)`` Q-values for skip (column 0) and select (column 1)."""
        return np.asarray(self.online(torch.as_tensor(np.asarray(states, np.float32))).numpy())

    def choose(self, states: np.ndarray, k: int) -> np.ndarray:
        """Positions of ``k`` candidates (one round): best advantage, each slot random with
        probability epsilon."""
        n = len(states)
        k = min(k, n)
        if k == 0:
            return np.zeros(0, dtype=np.int64)
        q = self.q_values(states)
        ranked = list(np.argsort(-(q[:, 1] - q[:, 0]), kind="stable"))
        explore = self._rng.random(k) < self.epsilon()
        self.rounds_played += 1
        chosen: list[int] = []
        for random_slot in explore:
            if random_slot:
                rest = np.setdiff1d(np.arange(n), chosen)
                pick = int(self._rng.choice(rest))
            else:
                pick = next(int(i) for i in ranked if i not in chosen)
            chosen.append(pick)
        return np.asarray(chosen, dtype=np.int64)

    def remember(
        self,
        states: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        next_states: np.ndarray,
        done: np.ndarray,
    ) -> None:
        """Store transitions (rows aligned)."""
        for row in range(len(states)):
            slot = self._count % self.config.replay_size
            self._s[slot], self._a[slot], self._r[slot] = states[row], actions[row], rewards[row]
            self._s2[slot], self._done[slot] = next_states[row], float(done[row])
            self._count += 1

    def learn(self) -> float | None:
        """``updates_per_round`` gradient steps on replayed transitions; the last loss."""
        c = self.config
        stored = min(self._count, c.replay_size)
        if stored < min(c.batch_size, 16):
            return None
        loss_value = None
        for _ in range(c.updates_per_round):
            batch = self._rng.integers(0, stored, size=min(c.batch_size, stored))
            s, s2 = torch.as_tensor(self._s[batch]), torch.as_tensor(self._s2[batch])
            a, r, done = (
                torch.as_tensor(self._a[batch]),
                torch.as_tensor(self._r[batch]),
                torch.as_tensor(self._done[batch]),
            )
            with torch.no_grad():
                best = self.online(s2).argmax(dim=1, keepdim=True)  # online network chooses...
                bootstrap = self.target(s2).gather(1, best).squeeze(1)  # ...target network evaluates
                target = r + c.gamma * (1 - done) * bootstrap
            q = self.online(s).gather(1, a[:, None]).squeeze(1)
            loss = nn.functional.smooth_l1_loss(q, target)
            self._optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            self._optimizer.step()
            self._steps += 1
            if self._steps % c.target_sync == 0:
                self.target.load_state_dict(self.online.state_dict())
            loss_value = float(loss.detach())
        if loss_value is not None:
            self.losses.append(loss_value)
        return loss_value
