"""dtune's side of ``benchmarks/tune_overhead.py``: the same workloads as the Ray Tune anchor.

Runs one workload whose trainables do no work, so the cost measured is dtune's own: the warm
process pool, the driver loop, and the durable SQLite store (always on). Mirrors
``anchors/ray_tune_workloads.py`` key for key so the two JSON files compare directly.

    python benchmarks/workloads/dtune_tune_workloads.py bookkeeping --out results/dtune_bk.json
"""

# Imports follow the start timestamp on purpose, so they count in t_total.
# ruff: noqa: E402
from __future__ import annotations

import time

T_TOP = time.perf_counter()

import argparse
import json
import os
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _proc_tree import PeakRSSSampler

NUM_CPUS = 2
SAMPLE_INTERVAL_S = 0.05
WORKLOADS: dict[str, dict[str, int]] = {
    "bookkeeping": {"trials": 1000, "reports": 1, "concurrent": 2},
    "throughput": {"trials": 4, "reports": 2000, "concurrent": 4},
    "fixed": {"trials": 1, "reports": 1, "concurrent": 1},
}


def trainable(config: dict[str, Any]) -> None:
    """Report ``config["reports"]`` results and do no work."""
    import dtune

    for i in range(config["reports"]):
        dtune.report({"score": i + 1})


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    import dtune

    t_import = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="dtune-bench-") as storage:
        t0 = time.perf_counter()
        results = dtune.run(
            trainable,
            param_space={"reports": args.reports},
            metric="score",
            mode="max",
            num_samples=args.trials,
            resources=dtune.Resources(cpus=NUM_CPUS / args.concurrent),
            max_concurrent=args.concurrent,
            storage=storage,
            verbose=0,
        )
        t_fit = time.perf_counter() - t0
        db = sqlite3.connect(Path(results.experiment_path, "experiment.db"))
        recorded = db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        db.close()
    return {
        "dtune_version": dtune.__version__,
        "t_import": t_import,
        "t_fit": t_fit,
        "trials_per_s": args.trials / t_fit,
        "results_per_s": recorded / t_fit,
        "results_recorded": recorded,
        "results_expected": args.trials * args.reports,
        "trials_errored": len(results.errors),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("--trials", type=int)
    parser.add_argument("--reports", type=int)
    parser.add_argument("--concurrent", type=int)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    for key, default in WORKLOADS[args.workload].items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    with PeakRSSSampler(os.getpid(), interval=SAMPLE_INTERVAL_S) as sampler:
        measured = run(args)
    report = {
        "framework": "dtune",
        "workload": args.workload,
        "trials": args.trials,
        "reports_per_trial": args.reports,
        "concurrent": args.concurrent,
        "cpus_per_trial": NUM_CPUS / args.concurrent,
        **measured,
        "t_total": time.perf_counter() - T_TOP,
        "peak_rss_bytes": sampler.peak_bytes,
        "peak_rss_mib": sampler.peak_bytes / 2**20,
        "peak_processes": sampler.peak_processes,
        "python": sys.version.split()[0],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
