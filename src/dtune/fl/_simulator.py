"""A virtual-clock federated-learning simulator driven by device traces.

Each round, at virtual time ``clock``: the candidates are the clients online now (and not
excluded by policing); the selector picks up to ``num_select``; each selected client trains
(``local_steps * batch_size`` samples at its traced speed) then uploads the update
(``model_size_mb`` at its traced bandwidth). It is *valid* if it stays online and finishes both
phases by the deadline; only valid updates are aggregated. The round lasts until the last
participant reports, or the deadline if any did not (the server cannot tell slow from gone).
Timing is exact on the slotted traces; local training of the valid clients is one batched numpy
computation, so thousands of clients simulate without a process (or a Python loop) per client.

Reference: Lai et al., "FedScale: Benchmarking Model and System Performance of Federated
Learning at Scale", ICML 2022 (trace-driven virtual clock); Nishio and Yonetani, ICC 2019 and
Huang et al., arXiv 2002.00577 (deadline-based valid participants).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from dtune.fl._aggregation import Aggregator, FedAvg
from dtune.fl._attacks import Attack, AttackKind, inflate_forecasts
from dtune.fl._data import FederatedTask
from dtune.fl._forecast import Estimates, LSTMForecaster
from dtune.fl._metrics import RoundResult
from dtune.fl._model import ModelConfig, VectorModel
from dtune.fl._policing import Reputation
from dtune.fl._selection import RoundFeedback, SelectionContext, Selector
from dtune.fl._traces import TraceSet

__all__ = ["Simulator", "SimulatorConfig"]


@dataclass(frozen=True, kw_only=True)
class SimulatorConfig:
    """Round structure and the population's honesty.

    Args:
        num_select: participants per round (K).
        deadline_s: round deadline.
        model_size_mb: size of the uploaded update; a nominal size (like FedScale's model sizes),
            independent of the small model that is actually trained.
        horizon_factor: a client not done within this many deadlines counts as never finishing.
        server_lr: the global model moves by ``server_lr`` times the aggregated update.
        liar_fraction: fraction of clients that inflate the forecasts they send.
        liar_factor: how much they inflate (see :func:`dtune.fl.inflate_forecasts`).
    """

    num_select: int = 10
    deadline_s: float = 30.0
    model_size_mb: float = 15.0
    horizon_factor: float = 4.0
    server_lr: float = 1.0
    liar_fraction: float = 0.0
    liar_factor: float = 0.25

    def __post_init__(self) -> None:
        if isinstance(self.num_select, bool) or not isinstance(self.num_select, int) or self.num_select < 1:
            raise ValueError(
                f"The value of `num_select` is {self.num_select!r}, but must be an integer >= 1."
            )
        for name in ("deadline_s", "model_size_mb", "server_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"The value of `{name}` is {getattr(self, name)!r}, but must be > 0.")
        if not self.horizon_factor >= 1:
            raise ValueError(f"The value of `horizon_factor` is {self.horizon_factor!r}, but must be >= 1.")
        if not 0 <= self.liar_fraction <= 1:
            raise ValueError(
                f"The value of `liar_fraction` is {self.liar_fraction!r}, but must be in [0, 1]."
            )
        if not 0 < self.liar_factor <= 1:
            raise ValueError(f"The value of `liar_factor` is {self.liar_factor!r}, but must be in (0, 1].")


class Simulator:
    """Drive federated training round by round on traces (``step``), or for a while (``run``).

    Example:
        >>> from dtune.fl import (RandomSelector, TaskConfig, TraceConfig, generate_traces, make_task)
        >>> traces = generate_traces(TraceConfig(num_clients=20, duration_s=3600, history_s=600), seed=0)
        >>> task = make_task(TaskConfig(num_clients=20), seed=0)
        >>> sim = Simulator(traces=traces, task=task, selector=RandomSelector(seed=0),
        ...                 config=SimulatorConfig(num_select=5), seed=0)
        >>> result = sim.step()
        >>> result.round, len(result.selected)
        (0, 5)
    """

    def __init__(
        self,
        *,
        traces: TraceSet,
        task: FederatedTask,
        selector: Selector,
        config: SimulatorConfig | None = None,
        model: ModelConfig | None = None,
        aggregator: Aggregator | None = None,
        attack: Attack | None = None,
        forecaster: LSTMForecaster | None = None,
        police: Reputation | None = None,
        seed: int,
    ) -> None:
        self.config = config or SimulatorConfig()
        if traces.num_clients != task.num_clients:
            raise ValueError(
                f"The traces have {traces.num_clients} clients but the task has {task.num_clients}; "
                "they must describe the same clients."
            )
        if not isinstance(selector, Selector):
            raise TypeError(f"`selector` must be a dtune.fl.Selector, got {type(selector).__name__}.")
        self.traces, self.task, self.selector = traces, task, selector
        self.aggregator = aggregator or FedAvg()
        self.aggregator.check(self.config.num_select)  # refuse a round size outside its guarantee
        self.attack, self.police, self.forecaster = attack, police, forecaster
        if forecaster is not None:
            covered = forecaster.config.horizon * traces.step_s
            if covered < self.config.deadline_s:
                raise ValueError(
                    f"The forecaster's horizon covers {covered:g} s ({forecaster.config.horizon} slots), "
                    f"but must cover the deadline of {self.config.deadline_s:g} s: "
                    "raise ForecastConfig.horizon."
                )
            if not forecaster.fitted:
                forecaster.fit(traces)
        self.model = VectorModel(task.num_features, task.num_classes, model)
        sequence = np.random.SeedSequence(seed)
        init_rng, liar_rng, self._train_rng, self._attack_rng = (
            np.random.default_rng(s) for s in sequence.spawn(4)
        )
        self.theta = self.model.init(init_rng)
        self.liars = np.zeros(task.num_clients, bool)
        liars = round(self.config.liar_fraction * task.num_clients)
        self.liars[liar_rng.choice(task.num_clients, size=liars, replace=False)] = True
        self.clock_s = traces.start_s
        self.round = 0
        self.accuracy, self.loss = self.model.evaluate(self.theta, task.x_test, task.y_test)
        self.history: list[RoundResult] = []
        self._promised: dict[int, tuple[float, float, float]] = {}

    @property
    def work(self) -> float:
        return float(self.model.config.samples_per_round)

    @property
    def upload_mbit(self) -> float:
        return 8.0 * self.config.model_size_mb

    def _observed(self, candidates: np.ndarray) -> Estimates:
        speed, bandwidth, _ = self.traces.at(self.clock_s, candidates)
        with np.errstate(divide="ignore"):
            train = np.where(speed > 0, self.work / speed, np.inf)
            report = np.where(bandwidth > 0, self.upload_mbit / bandwidth, np.inf)
        return Estimates(train_s=train, report_s=report, p_available=np.ones(len(candidates)))

    def _forecasts(self, clients: np.ndarray) -> Estimates:
        """Clients compute forecasts locally; strategic liars inflate what they send."""
        assert self.forecaster is not None  # only reachable through a context that has one
        sent = self.forecaster.forecast(self.traces, clients, self.clock_s).estimates(
            self.work, self.upload_mbit
        )
        sent = inflate_forecasts(sent, self.liars[clients], self.config.deadline_s, self.config.liar_factor)
        for i, client in enumerate(clients.tolist()):
            self._promised[client] = (
                float(sent.train_s[i]),
                float(sent.report_s[i]),
                float(sent.p_available[i]),
            )
        return sent

    def _candidates(self) -> np.ndarray:
        _, _, online = self.traces.at(self.clock_s)
        candidates = np.flatnonzero(online)
        if self.police is not None and len(candidates):
            candidates = candidates[~self.police.is_excluded(candidates)]
        return candidates

    def _select(self, candidates: np.ndarray) -> np.ndarray:
        context = SelectionContext(
            round=self.round, clock_s=self.clock_s, deadline_s=self.config.deadline_s,
            num_select=self.config.num_select, candidates=candidates,
            num_samples=self.task.sizes[candidates], observed=self._observed(candidates),
            forecaster=self._forecasts if self.forecaster is not None else None,
        )  # fmt: skip
        selected = np.asarray(self.selector.select(context), dtype=np.int64)
        if (
            selected.ndim != 1
            or len(selected) > self.config.num_select
            or len(np.unique(selected)) != len(selected)
            or not np.isin(selected, candidates).all()
        ):
            raise ValueError(
                f"{self.selector!r}.select() must return at most {self.config.num_select} distinct ids "
                f"from context.candidates, got {selected.tolist()!r}."
            )
        return np.sort(selected)

    def _train(self, participants: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Updates (as received) and utilities of the valid participants; number of attackers."""
        attackers = np.zeros(len(participants), bool)
        if self.attack is not None:
            attackers = self.attack.choose(len(participants), self._attack_rng)
        flip = attackers if self.attack is not None and self.attack.kind is AttackKind.LABEL_FLIP else None
        result = self.model.local_train(
            self.theta, self.task, participants, self._train_rng, flip_labels=flip
        )
        updates = result.updates
        if self.attack is not None:
            updates = self.attack.corrupt(updates, attackers, self._attack_rng)
        return updates, result.utility, int(attackers.sum())

    def step(self) -> RoundResult:
        """Play one round and return what happened."""
        wall = time.perf_counter()
        deadline = self.config.deadline_s
        candidates = self._candidates()
        self._promised = {}
        selected = self._select(candidates) if len(candidates) else np.zeros(0, np.int64)
        phases = self.traces.phase_times(
            selected, self.clock_s, self.work, self.upload_mbit, self.config.horizon_factor * deadline
        )
        valid, dropped = phases.valid(deadline), phases.dropped(deadline)
        latency = float(phases.total_s.max()) if len(selected) and valid.all() else deadline
        participants = selected[valid]
        utility = np.full(len(selected), np.nan)
        updates, attackers, aggregated = np.zeros((0, self.model.size)), 0, False
        if len(participants):
            updates, utility[valid], attackers = self._train(participants)
            if self._accepts(len(participants)):
                aggregate = self.aggregator.aggregate(updates, weights=self.task.sizes[participants])
                self.theta = self.theta + self.config.server_lr * aggregate
                aggregated = True
        before = self.accuracy
        self.accuracy, self.loss = self.model.evaluate(self.theta, self.task.x_test, self.task.y_test)
        newly = self._police(selected, valid, phases.total_s, updates)
        result = RoundResult(
            round=self.round, start_s=self.clock_s, latency_s=latency, num_candidates=len(candidates),
            selected=selected, valid=valid, dropped=dropped, duration_s=phases.total_s, aggregated=aggregated,
            accuracy=self.accuracy, loss=self.loss, num_attackers=attackers,
            liars_selected=int(self.liars[selected].sum()), newly_excluded=newly,
            wall_s=time.perf_counter() - wall,
        )  # fmt: skip
        if len(selected):
            self.selector.feedback(RoundFeedback(
                round=self.round, deadline_s=deadline, selected=selected, valid=valid, dropped=dropped,
                duration_s=phases.total_s, utility=utility, accuracy_gain=self.accuracy - before,
                latency_s=latency,
            ))  # fmt: skip
        self.history.append(result)
        self.clock_s += latency
        self.round += 1
        return result

    def _police(
        self, selected: np.ndarray, valid: np.ndarray, total_s: np.ndarray, updates: np.ndarray
    ) -> np.ndarray:
        """Give the reputation this round's evidence; return the clients it newly excludes."""
        if self.police is None or not len(selected):
            return np.zeros(0, np.int64)
        promised = None
        if all(int(c) in self._promised for c in selected):  # they all sent forecasts
            rows = np.array([self._promised[int(c)] for c in selected])
            promised = Estimates(train_s=rows[:, 0], report_s=rows[:, 1], p_available=rows[:, 2])
        return self.police.record(
            selected, valid, total_s, self.config.deadline_s, promised=promised, updates=updates
        )

    def _accepts(self, n: int) -> bool:
        try:
            self.aggregator.check(n)
        except ValueError:
            return False  # fewer valid updates than the aggregator's guarantee needs: keep the model
        return True

    def run(
        self, rounds: int | None = None, *, until_s: float | None = None, target_accuracy: float | None = None
    ) -> list[RoundResult]:
        """Play ``rounds`` rounds, or until the virtual clock passes ``until_s`` seconds of
        training, or until the test accuracy reaches ``target_accuracy`` (whichever comes first)."""
        if rounds is None and until_s is None and target_accuracy is None:
            raise ValueError("Give `rounds`, `until_s` or `target_accuracy`, or the run would never end.")
        played: list[RoundResult] = []
        while rounds is None or len(played) < rounds:
            if until_s is not None and self.clock_s - self.traces.start_s >= until_s:
                break
            played.append(self.step())
            if target_accuracy is not None and self.accuracy >= target_accuracy:
                break
        return played
