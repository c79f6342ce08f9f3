"""Federated learning: trace-driven simulation, proactive candidate selection, robust aggregation.

- Simulation: :class:`Simulator` plays rounds on a virtual clock over device traces
  (:class:`TraceSet`: speed, bandwidth, availability per slot), generated with predictable
  dynamics or as an i.i.d. control (:func:`generate_traces`) or converted from FedScale's format
  (:func:`from_fedscale`), on a Dirichlet non-IID task (:func:`make_task`).
- Selection (:class:`Selector`: ``select(context)``, ``feedback(round)``): random (FedAvg),
  reactive (FedCS), Oort, proactive (client-side LSTM forecasts + double DQN, Prophet) and the
  proactive-greedy ablation.
- Aggregation (:class:`Aggregator`): FedAvg, coordinate-wise median, trimmed mean, Krum,
  Multi-Krum, Bulyan, each refusing round sizes outside its guarantee; attack models
  (:class:`Attack`, strategic liars) and policing (:class:`Reputation`).
- ``dtune.run`` integration: :func:`tune_trainable` runs a simulation from a config dict and
  reports every round.
"""

from dtune.fl._aggregation import Aggregator, FedAvg, Median, TrimmedMean
from dtune.fl._attacks import Attack, AttackKind, inflate_forecasts
from dtune.fl._data import FederatedTask, TaskConfig, TaskKind, dirichlet_partition, make_task
from dtune.fl._dqn import DoubleDQN, DQNConfig
from dtune.fl._factory import (
    AggregatorKind,
    SelectorKind,
    build_simulation,
    make_aggregator,
    make_selector,
    tune_trainable,
)
from dtune.fl._fedscale import from_fedscale, load_fedscale, to_fedscale
from dtune.fl._forecast import Estimates, ForecastConfig, LSTMForecaster, SlotForecast, last_value_forecast
from dtune.fl._generate import TraceConfig, TraceKind, generate_traces
from dtune.fl._krum import Bulyan, Krum, MultiKrum, krum_scores
from dtune.fl._metrics import RoundResult, RunSummary, summarize
from dtune.fl._model import LocalResult, ModelConfig, VectorModel
from dtune.fl._oort import OortConfig, OortSelector
from dtune.fl._policing import PolicingConfig, Reputation, binomial_tail
from dtune.fl._proactive import ProactiveGreedySelector, ProactiveSelector
from dtune.fl._selection import (
    RandomSelector,
    ReactiveSelector,
    RoundFeedback,
    SelectionContext,
    Selector,
    greedy_fit,
)
from dtune.fl._simulator import Simulator, SimulatorConfig
from dtune.fl._traces import PhaseTimes, TraceSet

__all__ = [
    "Aggregator",
    "AggregatorKind",
    "Attack",
    "AttackKind",
    "Bulyan",
    "DQNConfig",
    "DoubleDQN",
    "Estimates",
    "FedAvg",
    "FederatedTask",
    "ForecastConfig",
    "Krum",
    "LSTMForecaster",
    "LocalResult",
    "Median",
    "ModelConfig",
    "MultiKrum",
    "OortConfig",
    "OortSelector",
    "PhaseTimes",
    "PolicingConfig",
    "ProactiveGreedySelector",
    "ProactiveSelector",
    "RandomSelector",
    "ReactiveSelector",
    "Reputation",
    "RoundFeedback",
    "RoundResult",
    "RunSummary",
    "SelectionContext",
    "Selector",
    "SelectorKind",
    "Simulator",
    "SimulatorConfig",
    "SlotForecast",
    "TaskConfig",
    "TaskKind",
    "TraceConfig",
    "TraceKind",
    "TraceSet",
    "TrimmedMean",
    "VectorModel",
    "binomial_tail",
    "build_simulation",
    "dirichlet_partition",
    "from_fedscale",
    "generate_traces",
    "greedy_fit",
    "inflate_forecasts",
    "krum_scores",
    "last_value_forecast",
    "load_fedscale",
    "make_aggregator",
    "make_selector",
    "make_task",
    "summarize",
    "to_fedscale",
    "tune_trainable",
]
