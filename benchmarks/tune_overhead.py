"""Tune overhead: dtune vs Ray Tune on the same no-work workloads, in one run.

Workloads (each in a fresh process per framework, so start-up and memory are measured whole):
1. bookkeeping: 1000 trials, a function trainable reporting one result, no work;
2. throughput: 4 concurrent trials x 2000 reports each;
3. fixed: one trial, one result: import + start + shut down, i.e. the fixed cost.
dtune runs with its durable store on; Ray Tune with reused actors and file loggers off, as in
Ray's own scalability release tests. Ray Tune is installed by ``anchors/setup_ray_venv.sh``
into ``benchmarks/.venv-ray`` (first run: about a minute).

    python benchmarks/tune_overhead.py [--repeats 3] [--skip-ray]

Writes ``benchmarks/results/tune_overhead.json`` (every run) and ``tune_overhead.md`` (medians
and dtune/Ray ratios), and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORKLOADS = ("bookkeeping", "throughput", "fixed")
TARGETS = {
    "bookkeeping trials/s": ">= 1000",
    "throughput results/s": ">= 20000",
    "fixed cost s (process start to exit)": "< 1",
    "peak RSS MiB of the process tree": "<= 200",
}


def ray_python() -> str:
    out = subprocess.run(
        ["bash", str(HERE / "anchors" / "setup_ray_venv.sh")], check=True, capture_output=True, text=True
    )
    return out.stdout.strip().splitlines()[-1]


def measure(python: str, script: Path, workload: str, out: Path, attempts: int = 2) -> dict[str, Any]:
    """Run one workload in a fresh process; add the process's own wall time (start to exit).

    A failed run is retried once (Ray's node start-up can time out on a loaded machine); the
    failure is kept in the record so the summary can say so.
    """
    failures = []
    for _ in range(attempts):
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        proc = subprocess.run(
            [python, str(script), workload, "--out", str(out)], capture_output=True, text=True, timeout=1800
        )
        wall = time.perf_counter() - start
        if proc.returncode == 0:
            data: dict[str, Any] = json.loads(out.read_text())
            data.update(t_process=wall, load_before=load_before, failed_attempts=failures)
            return data
        failures.append(
            proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        )
    raise RuntimeError(f"{script.name} {workload} failed {attempts} times: {failures}")


def median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def summarise(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> tuple[list[dict[str, Any]], str]:
    rows = []
    for label, workload, key, higher_is_better in [
        ("bookkeeping trials/s", "bookkeeping", "trials_per_s", True),
        ("throughput results/s", "throughput", "results_per_s", True),
        ("fixed cost s (process start to exit)", "fixed", "t_process", False),
        ("peak RSS MiB of the process tree", "throughput", "peak_rss_mib", False),
        ("bookkeeping: peak RSS MiB", "bookkeeping", "peak_rss_mib", False),
        ("bookkeeping: processes in the tree", "bookkeeping", "peak_processes", False),
    ]:
        d = runs["dtune"][workload]
        r = runs.get("ray_tune", {}).get(workload)
        dv = median(d, key)
        rv = median(r, key) if r else None
        ratio = None if rv is None else (dv / rv if higher_is_better else rv / dv)
        rows.append(
            {
                "metric": label,
                "dtune": dv,
                "dtune_min": min(x[key] for x in d),
                "dtune_max": max(x[key] for x in d),
                "ray_tune": rv,
                "dtune_advantage": ratio,
                "target": TARGETS.get(label, ""),
            }
        )
    lines = [
        "| metric | dtune (median) | dtune range | Ray Tune (median) | dtune advantage | target |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        ray = "-" if row["ray_tune"] is None else f"{row['ray_tune']:.4g}"
        adv = "-" if row["dtune_advantage"] is None else f"{row['dtune_advantage']:.1f}x"
        lines.append(
            f"| {row['metric']} | {row['dtune']:.4g} | {row['dtune_min']:.4g}-{row['dtune_max']:.4g} "
            f"| {ray} | {adv} | {row['target']} |"
        )
    return rows, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per framework and workload (default 3)")
    parser.add_argument("--skip-ray", action="store_true", help="measure dtune only")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    sides = {"dtune": (sys.executable, HERE / "workloads" / "dtune_tune_workloads.py")}
    if not args.skip_ray:
        print("setting up the Ray Tune anchor (benchmarks/.venv-ray)...", flush=True)
        sides["ray_tune"] = (ray_python(), HERE / "workloads" / "ray_tune_workloads.py")
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {s: {w: [] for w in WORKLOADS} for s in sides}
    for repeat in range(args.repeats):
        for workload in WORKLOADS:
            order = list(sides) if repeat % 2 == 0 else list(reversed(sides))  # alternate who goes first
            for side in order:
                python, script = sides[side]
                out = RESULTS / f"raw_{side}_{workload}_{repeat}.json"
                result = measure(python, script, workload, out)
                out.unlink()
                runs[side][workload].append(result)
                print(
                    f"[{repeat + 1}/{args.repeats}] {side:8s} {workload:11s} fit {result['t_fit']:.3f}s "
                    f"process {result['t_process']:.2f}s peak {result['peak_rss_mib']:.0f} MiB",
                    flush=True,
                )
    rows, table = summarise(runs)
    loads = [r["load_before"] for side in runs.values() for w in side.values() for r in w]
    header = (
        f"# Tune overhead: dtune vs Ray Tune ({time.strftime('%Y-%m-%d %H:%M')}, {args.repeats} repeats, "
        "2-core machine)\n\n'dtune advantage' is dtune/Ray for rates and Ray/dtune for costs. "
        f"1-minute load average before the runs: {min(loads):.1f} to {max(loads):.1f}.\n\n"
    )
    (RESULTS / "tune_overhead.json").write_text(json.dumps({"summary": rows, "runs": runs}, indent=1) + "\n")
    (RESULTS / "tune_overhead.md").write_text(header + table + "\n")
    print("\n" + header + table)


if __name__ == "__main__":
    main()
