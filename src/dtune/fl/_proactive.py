"""Proactive candidate selection: choose from clients' own forecasts of the coming round.

Prophet's second step: the server asks candidates for their forecasts (LSTM, computed client-side)
of training time, report time and availability, and a double-DQN agent picks the participants;
its reward is the fraction of valid participants, optionally plus the round's accuracy gain.

One addition: in Prophet's setting a round always lasts until the deadline, but here (as in
FedScale) it ends when the last participant reports, so finishing early has value. With
``latency_weight`` w > 0 a valid participant that reported after a fraction ``x`` of the
deadline earns ``1 + w * (1 - x)`` instead of 1; ``latency_weight=0`` is Prophet's reward.
:class:`ProactiveGreedySelector` is the ablation without the agent: the same forecasts, FedCS's
greedy deadline fit (it differs from :class:`ReactiveSelector` only in what it plans with).

Reference: Huang et al., "Prophet: Proactive Candidate-Selection for Federated Learning by
Predicting the Qualities of Training and Reporting Phases", arXiv 2002.00577.
"""

from __future__ import annotations

import numpy as np

from dtune.fl._dqn import DoubleDQN, DQNConfig
from dtune.fl._forecast import Estimates
from dtune.fl._selection import (
    RoundFeedback,
    SelectionContext,
    Selector,
    _check_pool_factor,
    greedy_fit,
    request_pool,
)

__all__ = ["ProactiveGreedySelector", "ProactiveSelector"]

NUM_FEATURES = 8
_STALE_CAP = 20


class ProactiveGreedySelector(Selector):
    """Forecasts plus FedCS's greedy deadline fit, no learning (the ablation).

    Example:
        >>> selector = ProactiveGreedySelector(seed=0)
    """

    def __init__(self, *, seed: int, pool_factor: float | None = None, min_p_available: float = 0.5) -> None:
        _check_pool_factor(pool_factor)
        if not 0 <= min_p_available <= 1:
            raise ValueError(f"The value of `min_p_available` is {min_p_available!r}, but must be in [0, 1].")
        self.seed, self.pool_factor, self.min_p_available = seed, pool_factor, min_p_available
        self._rng = np.random.default_rng(seed)

    def select(self, context: SelectionContext) -> np.ndarray:
        pool = request_pool(context, self.pool_factor, self._rng)
        forecasts = context.request_forecasts(pool)
        chosen = greedy_fit(forecasts, context.deadline_s, context.num_select, self.min_p_available)
        return np.sort(pool[chosen])


class _History:
    """Per-client record the server keeps: times selected, times valid, last round selected."""

    def __init__(self) -> None:
        self.selected = np.zeros(0, np.int64)
        self.valid = np.zeros(0, np.int64)
        self.last = np.zeros(0, np.int64)

    def grow(self, clients: np.ndarray) -> None:
        need = int(clients.max()) + 1 if len(clients) else 0
        if need > len(self.selected):
            extra = need - len(self.selected)
            self.selected = np.concatenate([self.selected, np.zeros(extra, np.int64)])
            self.valid = np.concatenate([self.valid, np.zeros(extra, np.int64)])
            self.last = np.concatenate([self.last, np.full(extra, -1, np.int64)])


def client_features(
    context: SelectionContext, pool: np.ndarray, forecasts: Estimates, history: _History
) -> np.ndarray:
    """The agent's view of each pool client ``(len(pool), 8)``, all roughly in [-1, 2]."""
    deadline = context.deadline_s
    observed = context.observed_for(pool)

    def slack(total: np.ndarray) -> np.ndarray:
        return np.clip((deadline - np.where(np.isfinite(total), total, 1e9)) / deadline, -1.0, 1.0)

    def share(seconds: np.ndarray) -> np.ndarray:
        return np.clip(np.where(np.isfinite(seconds), seconds, 1e9) / deadline, 0.0, 2.0)

    samples = context.num_samples[np.searchsorted(context.candidates, pool)]
    history.grow(pool)
    last = history.last[pool]
    stale = np.where(last < 0, 1.0, np.minimum(context.round - last, _STALE_CAP) / _STALE_CAP)
    success = (history.valid[pool] + 1.0) / (history.selected[pool] + 2.0)
    size = np.log1p(samples) / np.log1p(max(1, context.num_samples.max()))
    return np.stack(
        [slack(forecasts.total_s), forecasts.p_available, share(forecasts.train_s), share(forecasts.report_s),
         slack(observed.total_s), size, stale, success],
        axis=1,
    ).astype(np.float32)  # fmt: skip


class ProactiveSelector(Selector):
    """Forecasts from the clients, a double DQN to choose among them (Prophet).

    Args:
        seed: owns the pool sampling and the agent's initialisation and exploration.
        pool_factor: candidates asked for forecasts per round, times ``num_select`` (None: all).
        accuracy_weight: reward = valid (0/1) + ``accuracy_weight`` * the round's accuracy gain.
        latency_weight: extra reward for valid participants that report early (see above).
        agent: an agent to continue with (e.g. trained on an earlier run: DRL selectors are
            trained over episodes before they are deployed); a new one by default.
        dqn: the agent's configuration.

    Example:
        >>> selector = ProactiveSelector(seed=0)
    """

    def __init__(
        self,
        *,
        seed: int,
        pool_factor: float | None = None,
        accuracy_weight: float = 0.0,
        latency_weight: float = 1.0,
        dqn: DQNConfig | None = None,
        agent: DoubleDQN | None = None,
    ) -> None:
        _check_pool_factor(pool_factor)
        for name, value in (("accuracy_weight", accuracy_weight), ("latency_weight", latency_weight)):
            if not value >= 0:
                raise ValueError(f"The value of `{name}` is {value!r}, but must be >= 0.")
        self.seed, self.pool_factor = seed, pool_factor
        self.accuracy_weight, self.latency_weight = accuracy_weight, latency_weight
        self._rng = np.random.default_rng(seed)
        if agent is not None and agent.num_features != NUM_FEATURES:
            raise ValueError(f"The agent sees {agent.num_features} features, but must see {NUM_FEATURES}.")
        self.agent = agent if agent is not None else DoubleDQN(NUM_FEATURES, dqn, seed=seed)
        self._history = _History()
        # client -> (state, action, reward or None, round): transitions waiting for a next state
        self._pending: dict[int, tuple[np.ndarray, int, float | None, int]] = {}

    def select(self, context: SelectionContext) -> np.ndarray:
        pool = request_pool(context, self.pool_factor, self._rng)
        states = client_features(context, pool, context.request_forecasts(pool), self._history)
        self._complete(context.round, pool, states)
        chosen = self.agent.choose(states, context.num_select)
        picked = np.zeros(len(pool), dtype=bool)
        picked[chosen] = True
        # remember every selection but only as many skips: zero-reward skips would otherwise fill
        # the replay memory and starve the selections the agent must learn to rank
        skipped = np.flatnonzero(~picked)
        kept = self._rng.choice(skipped, size=min(len(chosen), len(skipped)), replace=False)
        for position in np.concatenate([chosen, kept]).tolist():
            self._pending[int(pool[position])] = (
                states[position],
                int(picked[position]),
                None if picked[position] else 0.0,
                context.round,
            )
        return np.sort(pool[chosen])

    def _complete(self, round: int, pool: np.ndarray, states: np.ndarray) -> None:
        """Close the pending transitions of clients seen again now; expire the old ones."""
        rows: list[tuple[np.ndarray, int, float, np.ndarray, bool]] = []
        for position, client in enumerate(pool.tolist()):
            pending = self._pending.pop(client, None)
            if pending is not None and pending[2] is not None:
                rows.append((pending[0], pending[1], pending[2], states[position], False))
        for client, (state, action, reward, since) in list(self._pending.items()):
            if round - since > self.agent.config.max_wait:
                if reward is not None:
                    rows.append((state, action, reward, state, True))
                del self._pending[client]
        if rows:
            self.agent.remember(
                np.stack([r[0] for r in rows]),
                np.array([r[1] for r in rows]),
                np.array([r[2] for r in rows]),
                np.stack([r[3] for r in rows]),
                np.array([r[4] for r in rows]),
            )

    def feedback(self, feedback: RoundFeedback) -> None:
        selected = np.asarray(feedback.selected, dtype=np.int64)
        self._history.grow(selected)
        self._history.selected[selected] += 1
        self._history.valid[selected] += feedback.valid.astype(np.int64)
        self._history.last[selected] = feedback.round
        early = np.clip(1 - feedback.duration_s / feedback.deadline_s, 0, 1)
        gain = self.accuracy_weight * feedback.accuracy_gain
        reward = feedback.valid * (1 + self.latency_weight * early + gain)
        for client, value in zip(selected.tolist(), reward.tolist(), strict=True):
            pending = self._pending.get(client)
            if pending is not None and pending[2] is None:
                self._pending[client] = (pending[0], pending[1], float(value), pending[3])
        self.agent.learn()
