"""Oort: guided participant selection by statistical and system utility.

Each explored client's score is its statistical utility (``|B_i| * sqrt(mean loss^2)`` from its
last participation, clipped and normalised) plus a confidence bonus ``sqrt(0.1 ln t / L_i)``
(``L_i`` the last round it took part), multiplied by ``(T / d_i) ** round_penalty`` when its last
duration ``d_i`` exceeds the preferred round duration ``T`` (a percentile of the known durations,
which the pacer relaxes when utility stops growing). A fraction of each round, decaying from
``exploration_factor`` by ``exploration_decay`` to ``exploration_min``, explores unseen clients
(favouring large and fast ones); the rest is sampled in proportion to score among the clients
scoring at least ``cut_off_util`` of the k-th best. Oort plans from past durations, not forecasts.

Reference: Lai et al., "Oort: Efficient Federated Learning via Guided Participant Selection",
OSDI 2021 (Algorithm 1); defaults follow FedScale's configuration of Oort.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dtune.fl._selection import RoundFeedback, SelectionContext, Selector

__all__ = ["OortConfig", "OortSelector"]


@dataclass(frozen=True, kw_only=True)
class OortConfig:
    """Oort's knobs (names as in FedScale's ``config_parser``)."""

    exploration_factor: float = 0.9
    exploration_decay: float = 0.98
    exploration_min: float = 0.3
    round_penalty: float = 2.0
    round_threshold: float = 30.0
    pacer_step: int = 20
    pacer_delta: float = 5.0
    cut_off_util: float = 0.95
    clip_bound: float = 0.9
    sample_window: float = 5.0
    failed_duration_factor: float = 4.0  # a client that never finished counts as this many deadlines

    def __post_init__(self) -> None:
        for name in (
            "exploration_factor",
            "exploration_decay",
            "exploration_min",
            "cut_off_util",
            "clip_bound",
        ):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"The value of `{name}` is {getattr(self, name)!r}, but must be in [0, 1].")
        if not 0 < self.round_threshold <= 100:
            raise ValueError(
                f"The value of `round_threshold` is {self.round_threshold!r}, but must be in (0, 100]."
            )
        if not isinstance(self.pacer_step, int) or self.pacer_step < 1:
            raise ValueError(
                f"The value of `pacer_step` is {self.pacer_step!r}, but must be an integer >= 1."
            )
        for name in ("round_penalty", "pacer_delta", "sample_window", "failed_duration_factor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"The value of `{name}` is {getattr(self, name)!r}, but must be > 0.")


class OortSelector(Selector):
    """Oort's training selector.

    Example:
        >>> selector = OortSelector(seed=0, config=OortConfig(round_penalty=2.0))
    """

    def __init__(self, *, seed: int, config: OortConfig | None = None) -> None:
        self.config = config or OortConfig()
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self.exploration = self.config.exploration_factor
        self.round_threshold = self.config.round_threshold
        self._round = 0
        self._known = np.zeros(0, bool)
        self._explored = np.zeros(0, bool)
        self._reward = np.zeros(0)
        self._duration = np.zeros(0)
        self._last = np.zeros(0, np.int64)
        self._exploited: np.ndarray = np.zeros(0, np.int64)
        self._succeeded: set[int] = set()
        self._exploit_history: list[float] = []

    def _register(self, context: SelectionContext) -> None:
        need = int(context.candidates.max()) + 1
        if need > len(self._known):
            extra = need - len(self._known)
            self._known = np.concatenate([self._known, np.zeros(extra, bool)])
            self._explored = np.concatenate([self._explored, np.zeros(extra, bool)])
            self._reward = np.concatenate([self._reward, np.zeros(extra)])
            self._duration = np.concatenate([self._duration, np.zeros(extra)])
            self._last = np.concatenate([self._last, np.zeros(extra, np.int64)])
        new = ~self._known[context.candidates]
        clients = context.candidates[new]
        # registration as in FedScale: reward = data size, duration = the device profile's estimate
        self._reward[clients] = context.num_samples[new]
        estimated = context.observed.total_s[new]
        self._duration[clients] = np.where(np.isfinite(estimated), estimated, 1e9)
        self._known[clients] = True

    def _pace(self) -> None:
        """Relax the preferred duration when exploited utility has flattened (or tighten it when
        it jumped), every ``pacer_step`` rounds."""
        succeeded = [c for c in self._exploited.tolist() if c in self._succeeded]
        self._exploit_history.append(float(self._reward[succeeded].sum()) / (len(succeeded) + 1e-4))
        self._succeeded = set()
        step, c = self.config.pacer_step, self.config
        if self._round >= 2 * step and self._round % step == 0:
            before = sum(self._exploit_history[-2 * step : -step])
            now = sum(self._exploit_history[-step:])
            if abs(now - before) <= 0.1 * before:
                self.round_threshold = min(100.0, self.round_threshold + c.pacer_delta)
            elif abs(now - before) >= 5 * before:
                self.round_threshold = max(c.pacer_delta, self.round_threshold - c.pacer_delta)

    def _scores(self, clients: np.ndarray, preferred: float) -> np.ndarray:
        reward = self._reward[clients]
        positive = reward[reward > 0]
        if len(positive):
            ordered = np.sort(positive)
            clip = ordered[min(int(len(ordered) * self.config.clip_bound), len(ordered) - 1)]
            low = ordered[0] * 0.999
            spread = max(ordered[-1] - low, 1e-4)
        else:
            clip, low, spread = 0.0, 0.0, 1.0
        score = (np.minimum(reward, clip) - low) / spread
        score = score + np.sqrt(0.1 * math.log(max(self._round, 2)) / np.maximum(self._last[clients], 1))
        return np.asarray(np.abs(score * self._penalty(clients, preferred)))

    def _penalty(self, clients: np.ndarray, preferred: float) -> np.ndarray:
        duration = self._duration[clients]
        slow = duration > preferred
        factor = np.ones(len(clients))
        factor[slow] = (preferred / np.maximum(duration[slow], 1e-4)) ** self.config.round_penalty
        return factor

    def _sample(self, pool: np.ndarray, weights: np.ndarray, k: int) -> np.ndarray:
        k = min(k, len(pool))
        if k == 0:
            return np.zeros(0, np.int64)
        positive = np.maximum(weights, 0)
        if positive.sum() <= 0 or np.count_nonzero(positive) < k:
            positive = positive + 1e-9
        return self._rng.choice(pool, size=k, replace=False, p=positive / positive.sum())

    def select(self, context: SelectionContext) -> np.ndarray:
        self._round += 1
        self._register(context)
        self._pace()
        known = np.flatnonzero(self._known)
        preferred = np.inf
        if self.round_threshold < 100:
            durations = np.sort(self._duration[known])
            preferred = float(
                durations[min(int(len(durations) * self.round_threshold / 100), len(durations) - 1)]
            )
        k = min(context.num_select, len(context.candidates))
        explored = context.candidates[self._explored[context.candidates]]
        unexplored = context.candidates[~self._explored[context.candidates]]
        c = self.config
        self.exploration = max(self.exploration * c.exploration_decay, c.exploration_min)
        exploit_len = min(k - int(k * self.exploration), len(explored))
        exploited = np.zeros(0, np.int64)
        if exploit_len > 0:
            scores = self._scores(explored, preferred)
            order = np.argsort(-scores, kind="stable")
            cut = scores[order[exploit_len - 1]] * c.cut_off_util
            pool = order[scores[order] >= cut]
            exploited = self._sample(explored[pool], scores[pool], exploit_len)
        explore_len = min(k - len(exploited), len(unexplored))
        explored_now = np.zeros(0, np.int64)
        if explore_len > 0:
            # unexplored clients: prefer large data and fast estimated duration
            init = self._reward[unexplored] * self._penalty(unexplored, preferred)
            top = np.argsort(-init, kind="stable")[: max(explore_len, int(c.sample_window * explore_len))]
            explored_now = self._sample(unexplored[top], init[top], explore_len)
        chosen = np.concatenate([exploited, explored_now])
        if len(chosen) < k:  # not enough in one group: fill from the other by score
            rest = np.setdiff1d(context.candidates, chosen)
            fill = self._scores(rest, preferred)
            chosen = np.concatenate([chosen, rest[np.argsort(-fill, kind="stable")[: k - len(chosen)]]])
        self._exploited = exploited
        return np.sort(chosen.astype(np.int64))

    def feedback(self, feedback: RoundFeedback) -> None:
        selected = np.asarray(feedback.selected, dtype=np.int64)
        cap = self.config.failed_duration_factor * feedback.deadline_s
        duration = np.where(np.isfinite(feedback.duration_s), feedback.duration_s, cap)
        self._duration[selected] = duration
        self._explored[selected] = True
        valid = selected[feedback.valid]
        self._reward[valid] = np.nan_to_num(feedback.utility[feedback.valid])
        self._reward[selected[~feedback.valid]] = 0.0  # failed: no statistical utility this time
        self._last[valid] = self._round
        self._succeeded.update(valid.tolist())
