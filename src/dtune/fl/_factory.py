"""Build simulations from plain config dicts: what ``dtune.run`` samples and a trainable receives.

Options are Enums; a config dict carries their string values (``"proactive"``, ``"krum"``), which
are converted here with an error that lists the choices.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Any, TypeVar

from dtune.fl._aggregation import Aggregator, FedAvg, Median, TrimmedMean
from dtune.fl._data import TaskConfig, TaskKind, make_task
from dtune.fl._forecast import ForecastConfig, LSTMForecaster
from dtune.fl._generate import TraceConfig, TraceKind, generate_traces
from dtune.fl._krum import Bulyan, Krum, MultiKrum
from dtune.fl._model import ModelConfig
from dtune.fl._oort import OortSelector
from dtune.fl._proactive import ProactiveGreedySelector, ProactiveSelector
from dtune.fl._selection import RandomSelector, ReactiveSelector, Selector
from dtune.fl._simulator import Simulator, SimulatorConfig

__all__ = [
    "AggregatorKind",
    "SelectorKind",
    "build_simulation",
    "make_aggregator",
    "make_selector",
    "tune_trainable",
]

E = TypeVar("E", bound=enum.Enum)


class SelectorKind(enum.Enum):
    """The selectors a config dict can name."""

    RANDOM = "random"
    REACTIVE = "reactive"
    OORT = "oort"
    PROACTIVE = "proactive"
    PROACTIVE_GREEDY = "proactive_greedy"

    @property
    def needs_forecasts(self) -> bool:
        return self in (SelectorKind.PROACTIVE, SelectorKind.PROACTIVE_GREEDY)


class AggregatorKind(enum.Enum):
    """The aggregators a config dict can name."""

    FEDAVG = "fedavg"
    MEDIAN = "median"
    TRIMMED_MEAN = "trimmed_mean"
    KRUM = "krum"
    MULTI_KRUM = "multi_krum"
    BULYAN = "bulyan"


def _enum(kind: type[E], value: Any, name: str) -> E:
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(repr(k.value) for k in kind)
        raise ValueError(f"The value of `{name}` is {value!r}, but must be one of {choices}.") from None


def make_selector(kind: SelectorKind | str, *, seed: int) -> Selector:
    """A selector with its default configuration."""
    kind = _enum(SelectorKind, kind, "selector")
    if kind is SelectorKind.RANDOM:
        return RandomSelector(seed=seed)
    if kind is SelectorKind.REACTIVE:
        return ReactiveSelector(seed=seed)
    if kind is SelectorKind.OORT:
        return OortSelector(seed=seed)
    if kind is SelectorKind.PROACTIVE:
        return ProactiveSelector(seed=seed)
    return ProactiveGreedySelector(seed=seed)


def make_aggregator(
    kind: AggregatorKind | str, *, f: int = 0, beta: float = 0.2, m: int | None = None
) -> Aggregator:
    """An aggregator tolerating ``f`` Byzantine updates (Multi-Krum averages ``m``, default 5)."""
    kind = _enum(AggregatorKind, kind, "aggregator")
    if kind is AggregatorKind.FEDAVG:
        return FedAvg()
    if kind is AggregatorKind.MEDIAN:
        return Median(f=f)
    if kind is AggregatorKind.TRIMMED_MEAN:
        return TrimmedMean(beta=beta, f=f)
    if kind is AggregatorKind.KRUM:
        return Krum(f=f)
    if kind is AggregatorKind.MULTI_KRUM:
        return MultiKrum(f=f, m=m if m is not None else 5)
    return Bulyan(f=f)


def build_simulation(config: Mapping[str, Any]) -> Simulator:
    """A :class:`Simulator` from a flat config dict (every key optional).

    Keys: ``num_clients`` (100), ``num_select`` (10), ``deadline_s`` (30), ``selector``
    ("random"), ``aggregator`` ("fedavg"), ``f`` (0), ``trace_kind`` ("predictable"),
    ``task`` ("digits"), ``alpha`` (0.3), ``lr`` (0.05), ``local_steps`` (20), ``batch_size`` (16),
    ``model_size_mb`` (15), ``duration_s`` (36000), ``history_s`` (7200), ``forecast_steps``
    (200), ``seed`` (0).

    Example:
        >>> sim = build_simulation({"num_clients": 20, "num_select": 4, "duration_s": 3600, "history_s": 600})
        >>> sim.step().round
        0
    """
    seed = int(config.get("seed", 0))
    num_clients = int(config.get("num_clients", 100))
    selector_kind = _enum(SelectorKind, config.get("selector", "random"), "selector")
    trace_config = TraceConfig(
        num_clients=num_clients, kind=_enum(TraceKind, config.get("trace_kind", "predictable"), "trace_kind"),
        duration_s=float(config.get("duration_s", 36000.0)), history_s=float(config.get("history_s", 7200.0)),
    )  # fmt: skip
    traces = generate_traces(trace_config, seed=seed)
    task = make_task(
        TaskConfig(kind=_enum(TaskKind, config.get("task", "digits"), "task"), num_clients=num_clients,
                   alpha=float(config.get("alpha", 0.3))),
        seed=seed,
    )  # fmt: skip
    sim_config = SimulatorConfig(
        num_select=int(config.get("num_select", 10)), deadline_s=float(config.get("deadline_s", 30.0)),
        model_size_mb=float(config.get("model_size_mb", 15.0)),
    )  # fmt: skip
    forecaster = None
    if selector_kind.needs_forecasts:
        horizon = math.ceil(sim_config.deadline_s / traces.step_s) + 1
        forecast = ForecastConfig(
            window=24, batch=16, horizon=horizon, steps=int(config.get("forecast_steps", 200))
        )
        forecaster = LSTMForecaster(forecast, seed=seed).fit(traces)
    model = ModelConfig(
        lr=float(config.get("lr", 0.05)), local_steps=int(config.get("local_steps", 20)),
        batch_size=int(config.get("batch_size", 16)),
    )  # fmt: skip
    aggregator = make_aggregator(config.get("aggregator", "fedavg"), f=int(config.get("f", 0)))
    return Simulator(
        traces=traces, task=task, selector=make_selector(selector_kind, seed=seed), config=sim_config,
        model=model, aggregator=aggregator, forecaster=forecaster, seed=seed,
    )  # fmt: skip


def tune_trainable(config: dict[str, Any]) -> None:
    """A dtune trainable: one simulated federation, reporting every round.

    Plays ``config["rounds"]`` rounds (default 50), or fewer if ``config["time_budget_s"]`` of
    virtual time runs out first (so a longer deadline or a slower selection costs rounds), and
    reports ``accuracy``, ``loss``, ``valid_ratio`` (so far), ``round_valid_ratio``,
    ``latency_s`` and ``virtual_time_s``. Other keys: see :func:`build_simulation`. E.g.::

        dtune.run(dtune.fl.tune_trainable, metric="accuracy", mode="max",
                  param_space={"deadline_s": dtune.uniform(10, 60), "time_budget_s": 1800})
    """
    from dtune.tune.session import report

    simulation = build_simulation(config)
    budget = config.get("time_budget_s")
    selected = valid = 0
    for _ in range(int(config.get("rounds", 50))):
        result = simulation.step()
        selected += len(result.selected)
        valid += result.num_valid
        elapsed = result.end_s - simulation.traces.start_s
        report(
            {
                "accuracy": result.accuracy,
                "loss": result.loss,
                "valid_ratio": valid / max(selected, 1),
                "round_valid_ratio": result.num_valid / max(len(result.selected), 1),
                "latency_s": result.latency_s,
                "virtual_time_s": elapsed,
            }
        )
        if budget is not None and elapsed >= float(budget):
            break
