"""Client-side forecasts of the next round's training time, report time and availability.

Prophet's first step: each candidate predicts the quality of its own training and reporting phases
with an LSTM over its own history, and sends only the prediction to the server, never the trace.
Here every client owns a separate small LSTM (its own weights, trained on its own history only);
for speed the clients' networks are stacked along a leading client dimension and trained as one
torch batch (``bmm`` with per-client weights). Since the loss is a sum of per-client losses and
Adam is element-wise, this is exactly N independent trainings run side by side.

The LSTM predicts the next ``horizon`` slots of log speed, log bandwidth (both as a correction
to the last observed value, so it starts from the persistence forecast) and availability; the
same piecewise-constant timing as the simulator then turns the predicted slots into
``(train_s, report_s, p_available)``.

Reference: Huang et al., "Prophet: Proactive Candidate-Selection for Federated Learning by
Predicting the Qualities of Training and Reporting Phases", arXiv 2002.00577; Hochreiter &
Schmidhuber, "Long Short-Term Memory", Neural Computation 1997.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional

from dtune.fl._traces import TraceSet, time_to_finish

__all__ = ["Estimates", "ForecastConfig", "LSTMForecaster", "SlotForecast", "last_value_forecast"]

_FEATURES = 6  # see LSTMForecaster._table
_MAX_AGE = 256  # slots; longer runs of one availability state look alike


@dataclass(frozen=True)
class Estimates:
    """What a client sends for a round: predicted phase times and probability of staying online."""

    train_s: np.ndarray
    report_s: np.ndarray
    p_available: np.ndarray

    @property
    def total_s(self) -> np.ndarray:
        return np.asarray(self.train_s + self.report_s)


@dataclass(frozen=True)
class SlotForecast:
    """Per-slot forecasts; column 0 is the current slot (observed), then ``horizon`` future slots."""

    speed: np.ndarray
    bandwidth: np.ndarray
    p_available: np.ndarray
    offset_s: np.ndarray
    step_s: float

    def estimates(self, work: float, upload_mbit: float) -> Estimates:
        """Turn slot forecasts into phase times with the simulator's own timing model."""
        train = time_to_finish(self.speed, self.offset_s, np.full(len(self.speed), float(work)), self.step_s)
        report = np.full(len(train), np.inf)
        done = np.isfinite(train)
        if done.any():
            begin = self.offset_s[done] + train[done]
            first = np.floor(begin / self.step_s + 1e-9).astype(np.int64)
            cols = np.clip(
                first[:, None] + np.arange(self.bandwidth.shape[1])[None, :], 0, self.bandwidth.shape[1] - 1
            )
            rates = np.take_along_axis(self.bandwidth[done], cols, axis=1)
            rates[first[:, None] + np.arange(rates.shape[1])[None, :] >= rates.shape[1]] = 0.0
            report[done] = time_to_finish(
                rates, begin - first * self.step_s, np.full(int(done.sum()), upload_mbit), self.step_s
            )
        total = train + report
        # probability of staying online: the least likely slot the client needs (availability is
        # strongly autocorrelated, so a product over slots would be far too pessimistic)
        needed = np.where(np.isfinite(total), total, self.speed.shape[1] * self.step_s)
        begins = np.arange(self.speed.shape[1])[None, :] * self.step_s - self.offset_s[:, None]
        used = (begins < needed[:, None]) | (np.arange(self.speed.shape[1]) == 0)[None, :]
        p_available = np.where(used, self.p_available, 1.0).min(axis=1)
        return Estimates(train_s=train, report_s=report, p_available=p_available)


def last_value_forecast(traces: TraceSet, clients: np.ndarray, t: float, horizon: int) -> SlotForecast:
    """The persistence baseline: every future slot looks like the current one (what a reactive
    server assumes when it plans with the currently observed resources)."""
    speed, bandwidth, available = traces.at(t, clients)
    ones = np.ones((len(speed), horizon + 1))
    offset = np.full(len(speed), t - traces.slot(t) * traces.step_s)
    return SlotForecast(
        speed=speed[:, None] * ones, bandwidth=bandwidth[:, None] * ones,
        p_available=available[:, None] * ones, offset_s=offset, step_s=traces.step_s,
    )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class ForecastConfig:
    """Size and training of the per-client LSTMs.

    Args:
        window: slots of history each forecast looks at.
        horizon: slots forecast ahead (cover the round deadline plus a slot).
        hidden: LSTM units per client.
        steps: Adam steps on each client's history.
        batch: history windows per client per step.
        lr: Adam learning rate.
    """

    window: int = 24
    horizon: int = 12
    hidden: int = 16
    steps: int = 200
    batch: int = 16
    lr: float = 0.01

    def __post_init__(self) -> None:
        for name in ("window", "horizon", "hidden", "steps", "batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"The value of `{name}` is {value!r}, but must be an integer >= 1.")
        if not self.lr > 0:
            raise ValueError(f"The value of `lr` is {self.lr!r}, but must be > 0.")


class LSTMForecaster:
    """Per-client LSTMs trained client-side on each client's own trace history.

    ``fit`` trains on the history before ``traces.start_s``; ``forecast`` predicts the next slots
    for some clients at time ``t`` from the slots up to ``t`` only.

    Example:
        >>> from dtune.fl import TraceConfig, generate_traces
        >>> traces = generate_traces(TraceConfig(num_clients=4, duration_s=3600, history_s=1800), seed=0)
        >>> forecaster = LSTMForecaster(ForecastConfig(steps=5), seed=0).fit(traces)
        >>> forecaster.forecast(traces, np.arange(4), traces.start_s).speed.shape
        (4, 13)
    """

    def __init__(self, config: ForecastConfig | None = None, *, seed: int) -> None:
        self.config = config or ForecastConfig()
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)
        self._params: list[torch.Tensor] = []
        self._table_for: TraceSet | None = None
        self._table_cache: torch.Tensor | None = None
        self._norm: np.ndarray | None = None  # (clients, 4): mean/std of log speed and log bandwidth
        self.train_loss: list[float] = []

    @property
    def fitted(self) -> bool:
        """Whether ``fit`` has run."""
        return self._norm is not None

    def _table(self, traces: TraceSet) -> torch.Tensor:
        """Inputs ``(clients, slots, 6)`` for every slot of the trace, from each client's own rows.

        Features: z-scored log speed and log bandwidth (statistics of the client's history),
        availability, how long the client has been in its current availability state (a phone
        knows how long it has been charging), and the time of day as sine and cosine.
        """
        if self._norm is None:
            raise RuntimeError("The forecaster is not trained: call fit(traces) first.")
        if self._table_for is traces and self._table_cache is not None:
            return self._table_cache
        norm = self._norm
        speed = (np.log(traces.speed + 1e-9) - norm[:, 0:1]) / norm[:, 1:2]
        bandwidth = (np.log(traces.bandwidth + 1e-9) - norm[:, 2:3]) / norm[:, 3:4]
        available = traces.available
        # run length of the availability state, computed on the trace laid twice so it wraps
        twice = np.concatenate([available, available], axis=1)
        index = np.arange(twice.shape[1])
        changed = np.concatenate([np.ones((len(twice), 1), bool), twice[:, 1:] != twice[:, :-1]], axis=1)
        last_change = np.maximum.accumulate(np.where(changed, index[None, :], 0), axis=1)
        age = (index[None, :] - last_change)[:, traces.num_slots :]
        age_feature = np.log1p(np.minimum(age, _MAX_AGE)) / np.log1p(_MAX_AGE)
        angle = 2 * np.pi * (np.arange(traces.num_slots) * traces.step_s) / traces.day_s
        ones = np.ones((traces.num_clients, 1))
        stacked = np.stack(
            [speed, bandwidth, available.astype(np.float64), age_feature,
             ones * np.sin(angle)[None, :], ones * np.cos(angle)[None, :]], axis=-1,
        )  # fmt: skip
        self._table_for, self._table_cache = traces, torch.as_tensor(stacked, dtype=torch.float32)
        return self._table_cache

    def _init(self, n: int) -> None:
        h, f, out = self.config.hidden, _FEATURES, 3 * self.config.horizon
        bound = 1 / math.sqrt(h)

        def uniform(*shape: int) -> torch.Tensor:
            return ((torch.rand(*shape, generator=self._generator) * 2 - 1) * bound).requires_grad_()

        self._params = [uniform(n, f, 4 * h), uniform(n, h, 4 * h), uniform(n, 1, 4 * h),
                        uniform(n, h, out), torch.zeros(n, 1, out, requires_grad=True)]  # fmt: skip

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """x: (clients, batch, window, features) -> (clients, batch, 3 * horizon)."""
        w_x, w_h, b, w_o, b_o = self._params
        n, batch, window, _ = x.shape
        h = x.new_zeros(n, batch, self.config.hidden)
        c = x.new_zeros(n, batch, self.config.hidden)
        # unbind, not indexing: the backward of window slices would each materialise a full-size
        # zero gradient, which dominated training time
        projected = torch.bmm(x.reshape(n, batch * window, -1), w_x).reshape(n, batch, window, -1).unbind(2)
        for step in range(window):
            gates = torch.baddbmm(projected[step] + b, h, w_h)
            hidden = self.config.hidden
            # one sigmoid over the three contiguous gates is much cheaper than three over views
            i, f, o = torch.sigmoid(gates[..., : 3 * hidden]).chunk(3, dim=-1)
            c = f * c + i * torch.tanh(gates[..., 3 * hidden :])
            h = o * torch.tanh(c)
        return torch.bmm(h, w_o) + b_o

    def _split(
        self, out: torch.Tensor, last: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        horizon = self.config.horizon
        speed = last[..., 0:1] + out[..., :horizon]
        bandwidth = last[..., 1:2] + out[..., horizon : 2 * horizon]
        logit = out[..., 2 * horizon :] + 4.0 * (2 * last[..., 2:3] - 1)
        return speed, bandwidth, logit

    def fit(self, traces: TraceSet, end_s: float | None = None) -> LSTMForecaster:
        """Train every client's LSTM on its own slots before ``end_s`` (default: ``traces.start_s``)."""
        config = self.config
        end = traces.slot(traces.start_s if end_s is None else end_s)
        first_end, last_end = config.window - 1, end - 1 - config.horizon
        if last_end < first_end:
            raise ValueError(
                f"The history holds {end} slots, but must hold at least window + horizon = "
                f"{config.window + config.horizon} slots to train the forecaster."
            )
        n = traces.num_clients
        history = slice(0, end)
        log_speed, log_bandwidth = (
            np.log(traces.speed[:, history] + 1e-9),
            np.log(traces.bandwidth[:, history] + 1e-9),
        )
        self._norm = np.stack([log_speed.mean(1), log_speed.std(1) + 1e-3,
                               log_bandwidth.mean(1), log_bandwidth.std(1) + 1e-3], axis=1)  # fmt: skip
        self._table_for = None
        # slots before `end` only: the table's later columns are never read while training
        features = self._table(traces)
        self._init(n)
        optimizer = torch.optim.Adam(self._params, lr=config.lr)
        offsets = torch.arange(-config.window + 1, 1)
        ahead = torch.arange(1, config.horizon + 1)
        rows = torch.arange(n)[:, None, None]
        self.train_loss = []
        for _ in range(config.steps):
            ends = torch.randint(first_end, last_end + 1, (n, config.batch), generator=self._generator)
            x = features[rows, ends[:, :, None] + offsets]
            y = features[rows, ends[:, :, None] + ahead]
            speed, bandwidth, logit = self._split(self._run(x), x[:, :, -1])
            loss = (
                functional.mse_loss(speed, y[..., 0], reduction="none").mean((1, 2))
                + functional.mse_loss(bandwidth, y[..., 1], reduction="none").mean((1, 2))
                + functional.binary_cross_entropy_with_logits(logit, y[..., 2], reduction="none").mean((1, 2))
            ).sum()
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            self.train_loss.append(float(loss.detach()) / n)
        return self

    @torch.no_grad()
    def forecast(self, traces: TraceSet, clients: np.ndarray, t: float) -> SlotForecast:
        """Forecast the slots from ``t`` on for ``clients``, from their slots up to ``t`` only."""
        clients = np.asarray(clients, dtype=np.int64)
        now = traces.slot(t)
        columns = (now - self.config.window + 1 + np.arange(self.config.window)) % traces.num_slots
        x = self._table(traces)[torch.as_tensor(clients)[:, None], torch.as_tensor(columns)[None, :]][:, None]
        assert self._norm is not None  # set by fit, checked by _table
        saved = self._params
        self._params = [p[torch.as_tensor(clients)] for p in saved]
        try:
            speed, bandwidth, logit = self._split(self._run(x), x[:, :, -1])
        finally:
            self._params = saved
        norm = self._norm[clients]
        current_speed, current_bandwidth, _ = traces.at(t, clients)
        future_speed = np.exp(speed[:, 0].numpy() * norm[:, 1:2] + norm[:, 0:1])
        future_bandwidth = np.exp(bandwidth[:, 0].numpy() * norm[:, 3:4] + norm[:, 2:3])
        return SlotForecast(
            speed=np.concatenate([current_speed[:, None], future_speed], axis=1),
            bandwidth=np.concatenate([current_bandwidth[:, None], future_bandwidth], axis=1),
            p_available=np.concatenate(
                [np.ones((len(clients), 1)), torch.sigmoid(logit[:, 0]).numpy()], axis=1
            ),
            offset_s=np.full(len(clients), t - now * traces.step_s),
            step_s=traces.step_s,
        )
