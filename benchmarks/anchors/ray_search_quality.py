"""Ray Tune side of ``benchmarks/search_quality.py``: ASHA (random search) or PBT on one problem.

Runs the trainables of ``benchmarks/objectives.py`` unchanged, through a ``dtune`` shim over
``ray.tune.report``/``get_checkpoint``, with the settings of the research notes' anchor runs:
2 CPUs, actors reused, file loggers off. Must run under the virtualenv made by
``setup_ray_venv.sh`` (plus torch and scikit-learn from ``setup_ray_digits.sh`` for the MLP)::

    benchmarks/.venv-ray/bin/python benchmarks/anchors/ray_search_quality.py asha curve \
        --seed 0 --params '{"num_samples": 200, "max_t": 100, ...}' --out /tmp/ray.json

Writes ``{"results": [[metric, true, iteration], ...] (in the order the driver saw them),
"t_run": seconds of Tuner.fit(), "t_total": seconds from the first line to after shutdown}``.
"""

# ruff: noqa: E402
from __future__ import annotations

import time

T_TOP = time.perf_counter()

import argparse
import json
import logging
import os
import random
import sys
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCHMARKS))
os.environ["PYTHONPATH"] = os.pathsep.join([str(BENCHMARKS), os.environ.get("PYTHONPATH", "")])
os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import objectives

NUM_CPUS = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("algo", choices=("asha", "pbt"))
    parser.add_argument("problem", choices=sorted(objectives.TRAINABLES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", required=True, help="JSON: num_samples, max_t, constants, ...")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    p: dict[str, Any] = json.loads(args.params)
    random.seed(args.seed)  # Ray's PBT draws from the global generator

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining
    from ray.tune.search import BasicVariantGenerator

    logging.getLogger("ray.tune").setLevel(logging.ERROR)
    problem = args.problem

    def trainable(config: dict[str, Any]) -> None:
        objectives.ray_shim()
        objectives.TRAINABLES[problem](config)

    seen: list[list[float]] = []

    class Record(tune.Callback):
        def on_trial_result(
            self, iteration: int, trials: Any, trial: Any, result: dict[str, Any], **info: Any
        ) -> None:
            seen.append([result[p["metric"]], result["true"], result["training_iteration"]])

    if args.algo == "asha":
        scheduler: Any = ASHAScheduler(
            time_attr="training_iteration", max_t=p["max_t"], grace_period=1, reduction_factor=3
        )
    else:
        mutations = {k: objectives.space_for(problem, tune)[k] for k in p["mutations"]}
        scheduler = PopulationBasedTraining(
            time_attr="training_iteration", perturbation_interval=p["interval"],
            hyperparam_mutations=mutations, quantile_fraction=0.25, resample_probability=0.25,
            perturbation_factors=(1.2, 0.8),
        )  # fmt: skip
    ray.init(num_cpus=NUM_CPUS, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    space = {**objectives.space_for(problem, tune), **p["constants"]}
    storage = str(Path(p["storage"]).resolve())  # the caller deletes it once the clock stopped
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=p["metric"], mode=p["mode"], num_samples=p["num_samples"], scheduler=scheduler,
            search_alg=BasicVariantGenerator(points_to_evaluate=p.get("configs"), random_state=args.seed),
            reuse_actors=True,
        ),
        # every checkpoint is kept: with num_to_keep, Ray's PBT may restore from a deleted one
        # (ray-project/ray#9036, seen here too)
        run_config=tune.RunConfig(storage_path=storage, verbose=0, callbacks=[Record()]),
    )  # fmt: skip
    start = time.perf_counter()
    tuner.fit()
    t_run = time.perf_counter() - start
    ray.shutdown()
    report = {"results": seen, "t_run": t_run, "t_total": time.perf_counter() - T_TOP, "ray": ray.__version__}
    args.out.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
