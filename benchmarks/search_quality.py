"""Search quality: dtune's schedulers and searchers against Ray Tune and Optuna, at equal budget.

Pairs, each on every problem unless noted (problems: ``benchmarks/objectives.py``):

- ``asha``: dtune ``ASHA`` vs Ray Tune ``ASHAScheduler``, both over the same random configs
  (drawn once per seed and given to both as ``points_to_evaluate``), so that the pair compares
  the schedulers and not two draws of random search;
- ``hb``: dtune ``HyperBand`` + ``BOHB`` vs Optuna ``HyperbandPruner`` + ``TPESampler``;
- ``hbtpe``: dtune ``HyperBand`` + ``Optuna("tpe")`` (Optuna's own TPE through dtune's adapter)
  vs the same Optuna anchor: the like-for-like pair, where only the HyperBand differs;
- ``pbt``: dtune ``PBT`` vs Ray Tune ``PopulationBasedTraining`` (the MLP only).

Same trainables on every side, same number of trials, same rungs (grace 1, reduction factor 3),
same seeds. Every side runs in a fresh process, so wall time is end to end (interpreter,
imports, workers, shut-down); dtune runs each trial in a worker process, Ray Tune in reused
actors, Optuna in the driver itself.

**Equal budget.** The budget is the number of reported iterations. Each side's results are
replayed in the order its driver received them and both sides are scored after the same number
``B`` of them, the smaller of the two totals. The score is the noise-free value (``true``) of the
incumbent within ``B``, the best noisy result at the highest fidelity reached (see
:func:`score`): regret above the optimum for the synthetic problems, validation error
(1 - accuracy) for the MLP. Lower is better; ``dtune/anchor`` below 1 means dtune found the
better model.

    python benchmarks/search_quality.py [--seeds 5] [--problems curve,hartmann,digits]
                                        [--pairs asha,hb,hbtpe,pbt] [--quick] [--step-s S]

Ray Tune is installed on first use by ``anchors/setup_ray_venv.sh`` (+ ``setup_ray_digits.sh``
for torch and scikit-learn). Writes ``results/search_quality.json`` (every run) and
``results/search_quality.md`` (the summary table, also printed); ``--tag T`` names them
``search_quality-T.*`` so that runs of different problems can be kept side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

import objectives  # noqa: E402

# Work per iteration of the synthetic trainables, alike for all frameworks (``--step-s``). None by
# default, as in the anchor measurements of the research notes: the wall time is then the
# frameworks' own cost. dtune's schedulers decide in-band at their rungs (``decision_points``),
# so trials stop exactly where the anchors' do whatever the work per step.
STEP_S = 0.0
PROBLEMS: dict[str, dict[str, Any]] = {
    "curve": {
        "metric": "loss", "mode": "min", "num_samples": 200, "max_t": 100, "optimum": 1 / 101,
        "constants": {"max_t": 100, "step_s": STEP_S, "ckpt": False},
    },
    "hartmann": {
        "metric": "loss", "mode": "min", "num_samples": 100, "max_t": 27, "optimum": objectives.HARTMANN_MIN,
        "constants": {"max_t": 27, "step_s": STEP_S, "ckpt": False},
    },
    "digits": {
        "metric": "acc", "mode": "max", "num_samples": 20, "max_t": 9, "optimum": 1.0,
        "constants": {"epochs": 9},
    },
}  # fmt: skip
PBT = {"num_samples": 8, "max_t": 12, "interval": 3, "mutations": ["lr", "weight_decay", "batch_size"]}
PAIRS = {
    "asha": ("dtune-asha", "ray-asha"),
    "hb": ("dtune-hb", "optuna-hb"),
    "hbtpe": ("dtune-hbtpe", "optuna-hb"),
    "pbt": ("dtune-pbt", "ray-pbt"),
}


# -- the sides that run in dtune's environment (each in its own process) --------------------------------
def _dtune_side(side: str, problem: str, seed: int, p: dict[str, Any]) -> tuple[list[list[float]], float]:
    import dtune
    from dtune.tune.store import ExperimentStore

    space = {**objectives.space_for(problem, dtune), **p["constants"]}
    if side == "dtune-asha":
        scheduler: Any = dtune.schedulers.ASHA(max_t=p["max_t"], grace_period=1, reduction_factor=3)
        search: Any = dtune.search.Random(seed=seed, points_to_evaluate=p["configs"])
    elif side in ("dtune-hb", "dtune-hbtpe"):
        space["ckpt"] = True if "ckpt" in space else None  # HyperBand resumes paused trials
        space = {k: v for k, v in space.items() if v is not None}
        scheduler = dtune.schedulers.HyperBand(max_t=p["max_t"], reduction_factor=3)
        search = dtune.search.BOHB(seed=seed) if side == "dtune-hb" else dtune.search.Optuna("tpe", seed=seed)
    else:
        mutations = {k: objectives.space_for(problem, dtune)[k] for k in p["mutations"]}
        scheduler = dtune.schedulers.PBT(p["interval"], mutations, seed=seed)
        search = dtune.search.Random(seed=seed)
    start = time.perf_counter()
    dtune.run(
        objectives.TRAINABLES[problem], param_space=space, metric=p["metric"], mode=p["mode"],
        num_samples=p["num_samples"], scheduler=scheduler, search=search, storage=p["storage"],
        verbose=0, seed=seed,
    )  # fmt: skip
    t_run = time.perf_counter() - start
    store = ExperimentStore(p["storage"], readonly=True)
    seen = [[r[p["metric"]], r["true"], r["training_iteration"]] for _, r in store.all_results()]
    return seen, t_run


def _optuna_side(problem: str, seed: int, p: dict[str, Any]) -> tuple[list[list[float]], float]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seen: list[list[float]] = []
    current: dict[str, Any] = {}

    def report(metrics: dict[str, Any], checkpoint: Any = None) -> None:
        trial, current["t"] = current["trial"], current["t"] + 1
        value = metrics[p["metric"]]
        seen.append([value, metrics["true"], current["t"]])
        current["value"] = value
        trial.report(value, current["t"])
        if trial.should_prune():
            raise optuna.TrialPruned()

    objectives.install_shim(report)

    def objective(trial: Any) -> float:
        config = dict(p["constants"])
        for name, (kind, args) in objectives.SPACES[problem].items():
            if kind == "choice":
                config[name] = trial.suggest_categorical(name, args[0])
            else:
                config[name] = trial.suggest_float(name, *args, log=kind == "loguniform")
        current.update(trial=trial, t=0)
        objectives.TRAINABLES[problem](config)
        return float(current["value"])

    study = optuna.create_study(
        direction="minimize" if p["mode"] == "min" else "maximize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.HyperbandPruner(min_resource=1, max_resource=p["max_t"], reduction_factor=3),
    )
    start = time.perf_counter()
    study.optimize(objective, n_trials=p["num_samples"])
    return seen, time.perf_counter() - start


def worker(args: argparse.Namespace) -> None:
    p = json.loads(args.params)
    if args.side == "optuna-hb":
        seen, t_run = _optuna_side(args.problem, args.seed, p)
    else:
        seen, t_run = _dtune_side(args.side, args.problem, args.seed, p)
    args.out.write_text(json.dumps({"results": seen, "t_run": t_run}))


# -- the driver -----------------------------------------------------------------------------------------
def ray_python(problem: str) -> str:
    script = "setup_ray_digits.sh" if problem == "digits" else "setup_ray_venv.sh"
    out = subprocess.run(["bash", str(HERE / "anchors" / script)], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def run_side(side: str, problem: str, seed: int, p: dict[str, Any]) -> dict[str, Any]:
    """Run one side in a fresh process; its storage is deleted after the clock stops."""
    with tempfile.TemporaryDirectory(prefix="search-quality-") as tmp:
        out, p = Path(tmp, "out.json"), {**p, "storage": str(Path(tmp, "storage"))}
        if side.startswith("ray-"):
            algo = side.removeprefix("ray-")
            cmd = [ray_python(problem), str(HERE / "anchors" / "ray_search_quality.py"), algo, problem]
        else:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--problem", problem]
        cmd += ["--seed", str(seed), "--params", json.dumps(p), "--out", str(out)]
        load = os.getloadavg()[0]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{side} on {problem} (seed {seed}) failed:\n{proc.stderr[-4000:]}")
        data: dict[str, Any] = json.loads(out.read_text())
    data.update(side=side, problem=problem, seed=seed, t_process=wall, load_before=load)
    return data


def score(results: list[list[float]], budget: int, p: dict[str, Any], *, any_fidelity: bool = False) -> float:
    """Regret (or error) of the incumbent after ``budget`` results: lower is better.

    The incumbent is the best noisy result at the highest fidelity reached within the budget
    (BOHB's convention: what a user would deploy); ``any_fidelity`` takes the best noisy result
    at any fidelity instead, which rewards lucky noise on low-fidelity evaluations.
    """
    sign = 1.0 if p["mode"] == "min" else -1.0

    def key(r: list[float]) -> float:
        return sign * r[0] if isinstance(r[0], (int, float)) and math.isfinite(r[0]) else math.inf

    prefix = results[:budget]
    if not any_fidelity:
        top = max(r[2] for r in prefix)
        prefix = [r for r in prefix if r[2] == top]
    best = min(prefix, key=key)
    return sign * (best[1] - p["optimum"])


def params(problem: str, pair: str, quick: bool, step_s: float, seed: int) -> dict[str, Any]:
    p = dict(PROBLEMS[problem])
    if "step_s" in p["constants"]:
        p["constants"] = {**p["constants"], "step_s": step_s}
    if pair == "pbt":
        p.update(PBT, constants={"epochs": PBT["max_t"]})
    if quick:
        p["num_samples"] = max(8, p["num_samples"] // 5)
    if pair == "asha":  # random search on both sides: the very same configs, in the same order
        p["configs"] = objectives.sample_configs(problem, p["num_samples"], seed)
    return p


def summarise(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    rows: list[dict[str, Any]] = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["problem"], run["pair"]), []).append(run)
    for (problem, pair), pair_runs in groups.items():
        d = [r["dtune"] for r in pair_runs]
        a = [r["anchor"] for r in pair_runs]
        med = {k: statistics.median(x[k] for x in d) for k in ("score", "t_process")}
        amed = {k: statistics.median(x[k] for x in a) for k in ("score", "t_process")}
        rows.append(
            {
                "problem": problem,
                "pair": pair,
                "anchor": pair_runs[0]["anchor"]["side"],
                "seeds": len(pair_runs),
                "budget_median": statistics.median(r["budget"] for r in pair_runs),
                "dtune_score_median": med["score"],
                "dtune_score_range": [min(x["score"] for x in d), max(x["score"] for x in d)],
                "anchor_score_median": amed["score"],
                "anchor_score_range": [min(x["score"] for x in a), max(x["score"] for x in a)],
                "score_ratio": med["score"] / amed["score"] if amed["score"] > 0 else math.nan,
                "dtune_wins": sum(x["score"] <= y["score"] for x, y in zip(d, a, strict=True)),
                "dtune_wall_median": med["t_process"],
                "anchor_wall_median": amed["t_process"],
                "speedup": amed["t_process"] / med["t_process"],
            }
        )
    lines = [
        "| problem | pair (anchor) | budget B | dtune regret/error, median [min, max] "
        "| anchor, median [min, max] | dtune/anchor | dtune <= anchor | wall dtune s | wall anchor s "
        "| anchor/dtune wall |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["dtune_score_range"]
        alo, ahi = r["anchor_score_range"]
        lines.append(
            f"| {r['problem']} | {r['pair']} ({r['anchor']}) | {r['budget_median']:.0f} "
            f"| {r['dtune_score_median']:.4g} [{lo:.3g}, {hi:.3g}] | {r['anchor_score_median']:.4g} "
            f"[{alo:.3g}, {ahi:.3g}] | {r['score_ratio']:.2f} | {r['dtune_wins']}/{r['seeds']} "
            f"| {r['dtune_wall_median']:.2f} | {r['anchor_wall_median']:.2f} | {r['speedup']:.1f}x |"
        )
    return rows, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--problems", default="curve,hartmann,digits")
    parser.add_argument("--pairs", default="asha,hb,hbtpe,pbt")
    parser.add_argument("--quick", action="store_true", help="a fifth of the trials: a smoke test")
    parser.add_argument("--tag", default="", help="results go to search_quality-TAG.{json,md}")
    parser.add_argument("--step-s", type=float, default=STEP_S, help="work (sleep) per synthetic step")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--problem", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        worker(args)
        return
    runs = []
    anchors: dict[tuple[str, str, int], dict[str, Any]] = {}
    started = time.time()
    for seed in range(args.seeds):
        for problem in args.problems.split(","):
            for pair in args.pairs.split(","):
                if pair == "pbt" and problem != "digits":
                    continue
                p = params(problem, pair, args.quick, args.step_s, seed)
                dtune_side, anchor_side = PAIRS[pair]
                key = (anchor_side, problem, seed)  # two pairs share Optuna's run
                anchor = anchors[key] = anchors.get(key) or run_side(anchor_side, problem, seed, p)
                mine = run_side(dtune_side, problem, seed, p)
                budget = min(len(anchor["results"]), len(mine["results"]))
                run: dict[str, Any] = {"problem": problem, "pair": pair, "seed": seed, "budget": budget}
                for name, side in (("dtune", mine), ("anchor", anchor)):
                    run[name] = {
                        "side": side["side"], "score": score(side["results"], budget, p),
                        "score_any_fidelity": score(side["results"], budget, p, any_fidelity=True),
                        "total_budget": len(side["results"]), "t_process": side["t_process"],
                        "t_run": side["t_run"], "load_before": side["load_before"],
                        "results": side["results"],  # [metric, true value, iteration], in order
                    }  # fmt: skip
                runs.append(run)
                ours, theirs = run["dtune"], run["anchor"]
                print(
                    f"seed {seed} {problem:8} {pair:4}: B={budget:5d} dtune {ours['score']:.4g} "
                    f"({ours['t_process']:.1f} s, {ours['total_budget']} it) {anchor_side} "
                    f"{theirs['score']:.4g} ({theirs['t_process']:.1f} s, {theirs['total_budget']} it)",
                    flush=True,
                )
    rows, table = summarise(runs)
    RESULTS.mkdir(exist_ok=True)
    meta = {"seeds": args.seeds, "quick": args.quick, "step_s": args.step_s, "problems": PROBLEMS, "pbt": PBT,
            "elapsed_s": time.time() - started, "cpus": os.cpu_count()}  # fmt: skip
    name = "search_quality" + (f"-{args.tag}" if args.tag else "")
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "summary": rows, "runs": runs}, indent=1))
    (RESULTS / f"{name}.md").write_text(table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    main()
