"""Ray Tune anchor workloads for ``benchmarks/tune_overhead.py``.

Runs one Tune workload with the framework's own per-trial and per-result overhead as the only
cost (trainables do no work), so dtune's numbers can be put next to Ray Tune's on the same
machine. The workloads mirror Ray's own Tune scalability release tests, scaled to 2 CPUs:

- ``bookkeeping``: N trials, each reporting exactly one result, 1 CPU per trial.
- ``throughput``: 4 concurrent trials (0.5 CPU each) reporting R results each, no sleep.
- ``fixed``: one trial with one result, i.e. the fixed cost of import + init + fit + shutdown.

Must run under the Ray virtualenv made by ``setup_ray_venv.sh``::

    benchmarks/.venv-ray/bin/python benchmarks/workloads/ray_tune_workloads.py bookkeeping \
        --trials 1000 --out results/ray_bookkeeping.json

The JSON written to ``--out`` holds timings in seconds. ``t_total`` runs from the first line
of this script to after ``ray.shutdown()``; interpreter start-up before that is for the caller
to measure. ``peak_rss_bytes`` is the peak summed RSS of this process and all its
descendants (GCS, raylet, workers ...), sampled every 0.2 s.
"""

# Imports follow the start timestamp on purpose, so they count in t_total.
# ruff: noqa: E402
from __future__ import annotations

import time

T_TOP = time.perf_counter()

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _proc_tree import PeakRSSSampler

# Tune reads these when the Tuner runs; set them before Ray is imported to be safe.
# Default CSV/JSON/TensorBoard loggers off, as in Ray's own overhead release tests.
os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
# No usage-stats reporting: the machine has no network beyond PyPI.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

NUM_CPUS = 2
SAMPLE_INTERVAL_S = 0.2
WORKLOADS: dict[str, dict[str, int]] = {
    "bookkeeping": {"trials": 1000, "reports": 1, "concurrent": 2},
    "throughput": {"trials": 4, "reports": 2000, "concurrent": 4},
    "fixed": {"trials": 1, "reports": 1, "concurrent": 1},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; sizes left unset take the workload's defaults."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("--trials", type=int, help="number of trials")
    parser.add_argument("--reports", type=int, help="results reported per trial")
    parser.add_argument(
        "--concurrent",
        type=int,
        help=f"max concurrent trials; each trial asks for {NUM_CPUS}/concurrent CPUs",
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    for key, default in WORKLOADS[args.workload].items():
        if getattr(args, key) is None:
            setattr(args, key, default)
        if getattr(args, key) < 1:
            parser.error(f"--{key} must be >= 1")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the workload described by ``args`` and return its measurements."""
    t0 = time.perf_counter()
    import ray
    from ray import tune

    t_import = time.perf_counter() - t0
    # With the file loggers off, building the ResultGrid warns once per trial that it found no
    # result files; that is expected here and would flood stderr for 1000 trials.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)

    reports = args.reports

    def trainable(config: dict[str, Any]) -> None:
        """Report ``reports`` results and do no work: the cost measured is Tune's own."""
        for i in range(reports):
            tune.report({"score": i + 1})

    class CountResults(tune.Callback):
        """Counts the results that reach the driver's trial bookkeeping."""

        def __init__(self) -> None:
            self.count = 0

        def on_trial_result(self, *args: Any, **kwargs: Any) -> None:
            self.count += 1

    t0 = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=NUM_CPUS,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    t_init = time.perf_counter() - t0

    counter = CountResults()
    with tempfile.TemporaryDirectory(prefix="ray-anchor-") as storage:
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": NUM_CPUS / args.concurrent}),
            tune_config=tune.TuneConfig(
                num_samples=args.trials,
                max_concurrent_trials=args.concurrent,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=f"anchor_{args.workload}",
                storage_path=storage,
                verbose=0,
                callbacks=[counter],
            ),
        )
        t0 = time.perf_counter()
        grid = tuner.fit()
        t_fit = time.perf_counter() - t0
        errored = grid.num_errors

    t0 = time.perf_counter()
    ray.shutdown()
    t_shutdown = time.perf_counter() - t0

    return {
        "ray_version": ray.__version__,
        "t_import": t_import,
        "t_init": t_init,
        "t_fit": t_fit,
        "t_shutdown": t_shutdown,
        "trials_per_s": args.trials / t_fit,
        "results_per_s": counter.count / t_fit,
        "results_recorded": counter.count,
        "results_expected": args.trials * args.reports,
        "trials_errored": errored,
    }


def main(argv: list[str] | None = None) -> None:
    """Run one workload under a process-tree RSS sampler and write the JSON report."""
    args = parse_args(argv)
    with PeakRSSSampler(os.getpid(), interval=SAMPLE_INTERVAL_S) as sampler:
        measured = run(args)
    t_total = time.perf_counter() - T_TOP
    report = {
        "framework": "ray_tune",
        "workload": args.workload,
        "trials": args.trials,
        "reports_per_trial": args.reports,
        "concurrent": args.concurrent,
        "cpus_per_trial": NUM_CPUS / args.concurrent,
        "num_cpus": NUM_CPUS,
        **measured,
        "t_total": t_total,
        "peak_rss_bytes": sampler.peak_bytes,
        "peak_rss_mib": sampler.peak_bytes / 2**20,
        "peak_processes": sampler.peak_processes,
        "rss_samples": sampler.samples,
        "python": sys.version.split()[0],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
