"""Drive a federated simulation by hand, then let dtune search the round deadline and K.

Part 1 plays rounds of a 100-client federation on generated device traces with proactive
selection (client-side LSTM forecasts, a double-DQN agent) and prints how rounds went.
Part 2 hands a simulation to ``dtune.run``: every trial is one federation, reporting each round,
and the search looks for the deadline and number of participants that reach the best accuracy
within 20 minutes of virtual time (a long deadline buys valid participants but costs rounds).

    python examples/fl_deadline_search.py [--rounds 40] [--samples 6] [--storage runs/fl-deadline]
"""

from __future__ import annotations

import argparse
import math

import dtune
from dtune.fl import (
    ForecastConfig,
    LSTMForecaster,
    ModelConfig,
    ProactiveSelector,
    Simulator,
    SimulatorConfig,
    TaskConfig,
    TraceConfig,
    generate_traces,
    make_task,
    summarize,
)


def by_hand(rounds: int) -> None:
    traces = generate_traces(TraceConfig(num_clients=100), seed=0)
    horizon = math.ceil(30.0 / traces.step_s) + 1
    forecaster = LSTMForecaster(ForecastConfig(window=24, batch=16, steps=150, horizon=horizon), seed=0)
    forecaster.fit(traces)  # each client trains on its own history; only forecasts leave it
    sim = Simulator(
        traces=traces,
        task=make_task(TaskConfig(num_clients=100), seed=0),
        selector=ProactiveSelector(seed=0),
        config=SimulatorConfig(num_select=10, deadline_s=30.0),
        model=ModelConfig(hidden=32),
        forecaster=forecaster,
        seed=0,
    )
    for _ in range(rounds):
        r = sim.step()
        if r.round % 10 == 0:
            print(
                f"round {r.round:3d}  t={r.end_s - traces.start_s:6.0f}s  "
                f"valid {r.num_valid}/{len(r.selected)}  latency {r.latency_s:4.1f}s  "
                f"accuracy {r.accuracy:.3f}"
            )
    summary = summarize(sim.history, target_accuracy=0.9)
    print(f"valid ratio {summary.valid_ratio:.3f}, time to 90%: {summary.time_to_target_s:.0f} s (virtual)\n")


def search(samples: int, storage: str) -> None:
    results = dtune.run(
        dtune.fl.tune_trainable,
        param_space={
            "deadline_s": dtune.uniform(10.0, 60.0),
            "num_select": dtune.choice([5, 10, 20]),
            "selector": "reactive",
            "rounds": 500,
            "time_budget_s": 1200.0,
        },
        metric="accuracy",
        mode="max",
        num_samples=samples,
        storage=storage,
        seed=0,
    )
    best = results.best
    print(f"best: deadline {best.config['deadline_s']:.1f} s, K={best.config['num_select']}: {best.metrics}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--storage", default="runs/fl-deadline")
    args = parser.parse_args()
    by_hand(args.rounds)
    search(args.samples, args.storage)
