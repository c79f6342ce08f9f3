"""Federated candidate selection, robust aggregation and policing on simulated device traces.

Three experiments, all on the virtual-clock simulator (``dtune.fl``) with 100 clients holding a
Dirichlet(0.3) split of scikit-learn's digits (a 64-32-10 MLP), 10 selected per round:

1. selection: random (FedAvg, the anchor), reactive (FedCS, the anchor), Oort, proactive-greedy
   (client LSTM forecasts + greedy fit) and proactive (forecasts + double DQN; "pre-trained" ran two
   episodes on other traces first, "cold" starts from scratch), on predictable traces and on the
   i.i.d. control where prediction cannot help. Valid-participant ratio, dropout rate, round
   latency, virtual time to the target accuracy, final accuracy, simulator wall time.
2. attacks: 2 of each round's 10 participants attack (sign flip, scaling, Gaussian noise, label
   flip); FedAvg against median, trimmed mean, Krum, Multi-Krum and Bulyan (which needs
   n >= 4f + 3 = 11, so it runs with 11 selected and is shown refusing 10).
3. policing: 10% strategic liars inflate their forecasts; valid ratio without and with the
   reputation, and the honest clients it excludes (false positives).
4. scale: wall time of rounds with 1,000 and 5,000 clients.

    .venv/bin/python benchmarks/fl_selection.py [--quick]

Writes benchmarks/results/fl_selection.json and fl_selection.md and prints the summary.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtune.fl import (
    Attack,
    AttackKind,
    Bulyan,
    DoubleDQN,
    FedAvg,
    ForecastConfig,
    Krum,
    LSTMForecaster,
    Median,
    ModelConfig,
    MultiKrum,
    OortSelector,
    ProactiveGreedySelector,
    ProactiveSelector,
    RandomSelector,
    ReactiveSelector,
    Reputation,
    Selector,
    Simulator,
    SimulatorConfig,
    TaskConfig,
    TaskKind,
    TraceConfig,
    TraceKind,
    TraceSet,
    TrimmedMean,
    generate_traces,
    make_task,
    summarize,
)

RESULTS = Path(__file__).parent / "results"
CLIENTS, SELECT, DEADLINE, TARGET = 100, 10, 30.0, 0.93
MODEL = ModelConfig(hidden=32, lr=0.05, local_steps=20, batch_size=16)
SELECTORS = [
    "random",
    "reactive",
    "oort",
    "proactive-greedy",
    "proactive (DQN, pre-trained)",
    "proactive (DQN, cold)",
]


def traces_for(kind: TraceKind, seed: int) -> TraceSet:
    return generate_traces(TraceConfig(num_clients=CLIENTS, kind=kind, duration_s=36000.0), seed=seed)


def fit_forecaster(traces: TraceSet, seed: int, steps: int) -> tuple[LSTMForecaster, float]:
    start = time.perf_counter()
    horizon = math.ceil(DEADLINE / traces.step_s) + 1
    forecaster = LSTMForecaster(ForecastConfig(window=24, batch=16, steps=steps, horizon=horizon), seed=seed)
    return forecaster.fit(traces), time.perf_counter() - start


def make(name: str, seed: int, agent: DoubleDQN | None) -> Selector:
    if name == "random":
        return RandomSelector(seed=seed)
    if name == "reactive":
        return ReactiveSelector(seed=seed)
    if name == "oort":
        return OortSelector(seed=seed)
    if name == "proactive-greedy":
        return ProactiveGreedySelector(seed=seed)
    if name == "proactive (DQN, pre-trained)":
        return ProactiveSelector(seed=seed, agent=copy.deepcopy(agent))
    return ProactiveSelector(seed=seed)


def simulate(traces: TraceSet, seed: int, selector: Selector, rounds: int, **kwargs: Any) -> Simulator:
    config = kwargs.pop("config", SimulatorConfig(num_select=SELECT, deadline_s=DEADLINE))
    sim = Simulator(
        traces=traces,
        task=make_task(TaskConfig(num_clients=CLIENTS), seed=seed),
        selector=selector,
        config=config,
        model=MODEL,
        seed=seed,
        **kwargs,
    )
    sim.run(rounds)
    return sim


def pretrain_agent(kind: TraceKind, rounds: int, steps: int, episodes: int = 2) -> DoubleDQN:
    """Training episodes on traces that no evaluation seed uses."""
    traces = traces_for(kind, seed=1000)
    forecaster, _ = fit_forecaster(traces, 1000, steps)
    selector = ProactiveSelector(seed=1000)
    for episode in range(episodes):
        simulate(traces, 1000 + episode, selector, rounds, forecaster=forecaster)
    return selector.agent


def selection(
    kinds: list[TraceKind], seeds: list[int], rounds: int, steps: int
) -> tuple[dict[str, Any], dict[TraceKind, DoubleDQN]]:
    out: dict[str, Any] = {}
    agents: dict[TraceKind, DoubleDQN] = {}
    for kind in kinds:
        agent = agents[kind] = pretrain_agent(kind, rounds, steps)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in SELECTORS}
        fits = []
        for seed in seeds:
            traces = traces_for(kind, seed)
            forecaster, fit_s = fit_forecaster(traces, seed, steps)
            fits.append(fit_s)
            for name in SELECTORS:
                sim = simulate(traces, seed, make(name, seed, agent), rounds, forecaster=forecaster)
                runs[name].append(summarize(sim.history, TARGET).as_dict())
                print(f"  {kind.value:11s} seed {seed} {name:29s} {_brief(runs[name][-1])}", flush=True)
        out[kind.value] = {"runs": runs, "forecaster_fit_s": fits}
    return out, agents


def _brief(summary: dict[str, Any]) -> str:
    t = summary["time_to_target_s"]
    return (
        f"valid {summary['valid_ratio']:.3f} latency {summary['mean_latency_s']:5.1f}s "
        f"T{TARGET:.2f} {'never' if t is None else f'{t:6.0f}s'} final {summary['final_accuracy']:.3f}"
    )


ATTACKS = [None, AttackKind.SIGN_FLIP, AttackKind.SCALING, AttackKind.NOISE, AttackKind.LABEL_FLIP]
AGGREGATORS: dict[str, tuple[Any, int]] = {
    "FedAvg": (FedAvg(), SELECT),
    "median": (Median(f=2), SELECT),
    "trimmed mean (beta=0.2)": (TrimmedMean(beta=0.2, f=2), SELECT),
    "Krum (f=2)": (Krum(f=2), SELECT),
    "Multi-Krum (f=2, m=5)": (MultiKrum(f=2, m=5), SELECT),
    "Bulyan (f=2, 11 selected)": (Bulyan(f=2), 11),
}


def attacks(seeds: list[int], rounds: int, kinds: list[AttackKind | None]) -> dict[str, Any]:
    """Every participant valid (always online, generous deadline), so the aggregator always sees
    the full round and exactly 2 of its updates are Byzantine."""
    out: dict[str, Any] = {}
    try:
        Bulyan(f=2).check(SELECT)
    except ValueError as error:
        out["bulyan_at_10"] = str(error)
    reliable = TraceConfig(
        num_clients=CLIENTS, duration_s=36000.0, on_fraction=(1.0, 1.0), interruption_probability=0.0
    )
    for name, (aggregator, k) in AGGREGATORS.items():
        for kind in kinds:
            accuracies = []
            for seed in seeds:
                attack = None if kind is None else Attack(kind=kind, per_round=2)
                sim = simulate(
                    generate_traces(reliable, seed),
                    seed,
                    RandomSelector(seed=seed),
                    rounds,
                    config=SimulatorConfig(num_select=k, deadline_s=600.0),
                    aggregator=copy.deepcopy(aggregator),
                    attack=attack,
                )
                accuracies.append(summarize(sim.history, TARGET).final_accuracy)
            label = "clean" if kind is None else kind.value
            out.setdefault(name, {})[label] = accuracies
            print(f"  {name:26s} {label:10s} final accuracy {np.mean(accuracies):.3f}", flush=True)
    return out


def policing(seeds: list[int], rounds: int, steps: int, agent: DoubleDQN | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    settings = {
        "clean": (0.0, False),
        "clean + policing": (0.0, True),
        "10% liars": (0.1, False),
        "10% liars + policing": (0.1, True),
    }
    for seed in seeds:
        traces = traces_for(TraceKind.PREDICTABLE, seed)
        forecaster, _ = fit_forecaster(traces, seed, steps)
        for selector_name in ("proactive-greedy", "proactive (DQN, pre-trained)"):
            for setting, (fraction, police) in settings.items():
                config = SimulatorConfig(num_select=SELECT, deadline_s=DEADLINE, liar_fraction=fraction)
                sim = simulate(
                    traces,
                    seed,
                    make(selector_name, seed, agent),
                    rounds,
                    forecaster=forecaster,
                    config=config,
                    police=Reputation() if police else None,
                )
                excluded = (
                    sim.police.is_excluded(np.arange(CLIENTS)) if sim.police else np.zeros(CLIENTS, bool)
                )
                record = summarize(sim.history, TARGET).as_dict() | {
                    "liars": int(sim.liars.sum()),
                    "liars_excluded": int(excluded[sim.liars].sum()),
                    "honest_excluded": int(excluded[~sim.liars].sum()),
                    "liars_selected_per_round": float(np.mean([r.liars_selected for r in sim.history])),
                }
                out.setdefault(selector_name, {}).setdefault(setting, []).append(record)
                print(
                    f"  seed {seed} {selector_name:29s} {setting:21s} valid {record['valid_ratio']:.3f} "
                    f"liars excluded {record['liars_excluded']}/{record['liars']} "
                    f"honest excluded {record['honest_excluded']}",
                    flush=True,
                )
    return out


def _ratio(anchor: list[float | None], this: list[float | None]) -> str:
    """Anchor's mean time to target over this one's ("never" counts as infinitely long)."""
    a, b = (float(np.mean([math.inf if v is None else v for v in x])) for x in (anchor, this))
    if math.isinf(b):
        return "never reached"
    return "anchor never reached" if math.isinf(a) else f"{a / b:.2f}x"


def _ms(values: list[float], digits: int = 3) -> str:
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def _time(values: list[float | None]) -> str:
    if any(v is None for v in values):
        return f"never in {sum(v is None for v in values)}/{len(values)} seeds"
    return f"{np.mean(values):.0f} ± {np.std(values):.0f}"


def _selection_table(kind: str, data: dict[str, Any]) -> list[str]:
    runs = data["runs"]
    random_t = [v["time_to_target_s"] for v in runs["random"]]
    oort_t = [v["time_to_target_s"] for v in runs["oort"]]
    lines = [
        f"## Selection on {kind} traces (forecaster fit {np.mean(data['forecaster_fit_s']):.1f} s per seed)",
        "",
        "| selector | valid ratio | dropout rate | straggler rate | mean latency (s) | time to target (s) "
        "| speed-up vs random | speed-up vs Oort | final accuracy | sim wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, values in runs.items():
        t = [v["time_to_target_s"] for v in values]
        cells = [
            name,
            _ms([v["valid_ratio"] for v in values]),
            _ms([v["dropout_rate"] for v in values]),
            _ms([v["straggler_rate"] for v in values]),
            _ms([v["mean_latency_s"] for v in values], 1),
            _time(t),
            _ratio(random_t, t),
            _ratio(oort_t, t),
            _ms([v["final_accuracy"] for v in values]),
            f"{np.mean([v['wall_s'] for v in values]):.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, "", *_verdicts(kind, runs)]


def _attack_table(attack: dict[str, Any]) -> list[str]:
    rows = {k: v for k, v in attack.items() if k != "bulyan_at_10"}
    labels = list(next(iter(rows.values())))
    lines = [
        "## Robust aggregation: 2 of each round's participants attack (final accuracy)",
        "",
        "| aggregator | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    clean = np.mean(rows["FedAvg"]["clean"])
    for name, row in rows.items():
        own = np.mean(row["clean"])
        cells = [
            f"{np.mean(row[label]):.3f} ({100 * (np.mean(row[label]) - clean):+.1f} / "
            f"{100 * (np.mean(row[label]) - own):+.1f} pp)"
            for label in labels
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "(a / b pp): difference from clean FedAvg / from the same aggregator's clean run."]
    if "bulyan_at_10" in attack:
        lines += ["", f"Bulyan (f=2) with 10 selected is refused: `{attack['bulyan_at_10']}`"]
    return [*lines, ""]


def _policing_table(policed: dict[str, Any]) -> list[str]:
    lines = [
        "## Policing 10% strategic liars (predictable traces)",
        "",
        "| selector | setting | valid ratio | time to target (s) | liars selected / round | liars excluded "
        "| honest excluded (false positives) |",
        "|---|---|---|---|---|---|---|",
    ]
    for selector_name, settings in policed.items():
        for setting, values in settings.items():
            cells = [
                selector_name,
                setting,
                _ms([v["valid_ratio"] for v in values]),
                _time([v["time_to_target_s"] for v in values]),
                f"{np.mean([v['liars_selected_per_round'] for v in values]):.2f}",
                f"{sum(v['liars_excluded'] for v in values)}/{sum(v['liars'] for v in values)}",
                f"{sum(v['honest_excluded'] for v in values)}/{sum(CLIENTS - v['liars'] for v in values)}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        clean = np.mean([v["valid_ratio"] for v in settings["clean"]])
        liars = np.mean([v["valid_ratio"] for v in settings["10% liars"]])
        policed_ratio = np.mean([v["valid_ratio"] for v in settings["10% liars + policing"]])
        lines.append(
            f"| {selector_name} | valid ratio vs clean: liars {liars / clean:.3f}, "
            f"liars + policing {policed_ratio / clean:.3f} | | | | | |"
        )
    return [*lines, ""]


def _scale_table(scale: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## Simulator scale (random selection, synthetic task)",
        "",
        "| clients | selected / round | rounds | trace + task setup (s) | simulation (s) | ms per round |",
        "|---|---|---|---|---|---|",
    ]
    for row in scale:
        lines.append(
            f"| {row['clients']} | {row['select']} | {row['rounds']} | {row['setup_s']:.1f} "
            f"| {row['sim_s']:.2f} | {1000 * row['sim_s'] / row['rounds']:.1f} |"
        )
    return [*lines, ""]


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# Federated selection benchmark ({results['mode']})",
        "",
        f"{CLIENTS} clients, {SELECT} selected per round, deadline {DEADLINE:g} s, "
        f"{results['rounds']} rounds, seeds {results['seeds']}; target accuracy {TARGET} (5-round mean); "
        "mean ± std over seeds.",
        "",
    ]
    for kind, data in results["selection"].items():
        lines += _selection_table(kind, data)
    lines += _attack_table(results["attacks"])
    lines += _policing_table(results["policing"])
    lines += _scale_table(results["scale"])
    lines += [f"Total wall time: {results['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def _verdicts(kind: str, runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Paired per-seed differences of the main proactive selector against the anchors."""
    main = runs["proactive (DQN, pre-trained)"]
    lines = []
    for anchor in ("random", "reactive", "oort"):
        for metric in ("valid_ratio", "time_to_target_s"):
            a = np.array([math.inf if v[metric] is None else v[metric] for v in runs[anchor]])
            b = np.array([math.inf if v[metric] is None else v[metric] for v in main])
            diff = b - a
            if not np.all(np.isfinite(diff)):
                lines.append(f"- {kind}: proactive vs {anchor} on {metric}: not reached in every seed")
                continue
            spread = 2 * np.std(diff, ddof=1) / math.sqrt(len(diff)) if len(diff) > 1 else math.inf
            verdict = (
                "within noise" if abs(diff.mean()) <= spread else ("higher" if diff.mean() > 0 else "lower")
            )
            lines.append(
                f"- {kind}: proactive - {anchor}, {metric}: {diff.mean():+.3f} "
                f"(2 s.e. of the paired difference {spread:.3f}) -> {verdict}"
            )
    return [*lines, ""]


def scale(sizes: list[int], rounds: int) -> list[dict[str, Any]]:
    out = []
    for clients in sizes:
        start = time.perf_counter()
        traces = generate_traces(TraceConfig(num_clients=clients, duration_s=7200.0, history_s=600.0), seed=0)
        task = make_task(TaskConfig(kind=TaskKind.SYNTHETIC, num_clients=clients), seed=0)
        setup = time.perf_counter() - start
        sim = Simulator(
            traces=traces,
            task=task,
            selector=RandomSelector(seed=0),
            config=SimulatorConfig(num_select=100),
            seed=0,
        )
        start = time.perf_counter()
        sim.run(rounds)
        row = {
            "clients": clients,
            "select": 100,
            "rounds": rounds,
            "setup_s": setup,
            "sim_s": time.perf_counter() - start,
        }
        print(f"  {clients} clients: {row['sim_s']:.2f} s for {rounds} rounds", flush=True)
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, fewer rounds: a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds, rounds, steps = ([0], 100, 80) if args.quick else ([0, 1, 2], 200, 200)
    attack_kinds = [None, AttackKind.SIGN_FLIP, AttackKind.NOISE] if args.quick else ATTACKS
    start = time.perf_counter()
    print("selection", flush=True)
    chosen, agents = selection([TraceKind.PREDICTABLE, TraceKind.IID], seeds, rounds, steps)
    print("attacks", flush=True)
    attacked = attacks(seeds, min(rounds, 150), attack_kinds)
    print("policing", flush=True)
    policed = policing(seeds, rounds, steps, agents[TraceKind.PREDICTABLE])
    print("scale", flush=True)
    scaled = scale([1000] if args.quick else [1000, 5000], 20 if args.quick else 50)
    results = {
        "mode": "quick" if args.quick else "full",
        "seeds": seeds,
        "rounds": rounds,
        "selection": chosen,
        "attacks": attacked,
        "policing": policed,
        "scale": scaled,
        "wall_s": time.perf_counter() - start,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fl_selection.json").write_text(json.dumps(results, indent=1))
    summary = markdown(results)
    (RESULTS / "fl_selection.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
