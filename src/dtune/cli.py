"""The ``dtune`` command: look at, continue and export experiments from the shell."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _load(experiment_dir: str) -> tuple[Any, dict[str, Any]]:
    """The experiment's store and the metric/mode it was started with."""
    from dtune.tune.store import ExperimentStore

    store = ExperimentStore(experiment_dir, readonly=True)
    blob = store.get_meta("spec")
    if blob is None:
        raise SystemExit(f"dtune: {experiment_dir} holds no dtune experiment.")
    fingerprint = json.loads(store.get_meta("fingerprint") or b"{}")
    spec = {"metric": fingerprint.get("metric"), "mode": fingerprint.get("mode")}
    return store, spec


def _status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from dtune.tune.results import metric_score

    store, spec = _load(args.experiment_dir)
    trials = store.load_trials()
    metric, mode = spec["metric"], spec["mode"]
    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial.status.value] = counts.get(trial.status.value, 0) + 1
    summary = ", ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items()))
    trials.sort(key=lambda t: -metric_score((t.last_result or {}).get(metric), mode))
    console = Console()
    console.print(
        f"{args.experiment_dir}: {len(trials)} trials ({summary}); {metric} ({mode})", soft_wrap=True
    )
    table = Table()
    keys = sorted({k for t in trials for k in t.config if not isinstance(t.config[k], dict)})
    for column in ["trial", "status", *keys, "iter", metric, "error"]:
        table.add_column(column)
    for trial in trials[: args.limit]:
        last = trial.last_result or {}
        error = (trial.error or "").strip().splitlines()[-1:] or [""]
        table.add_row(
            trial.trial_id,
            trial.status.value,
            *(f"{trial.config.get(k, '')!s:.10}" for k in keys),
            str(last.get("training_iteration", "")),
            f"{last.get(metric, '')!s:.8}",
            error[0][:60],
        )
    console.print(table)
    return 0


def _resume(args: argparse.Namespace) -> int:
    import dtune

    results = dtune.resume(args.experiment_dir, verbose=args.verbose)
    best = results.best
    print(
        f"best trial {best.trial_id}: {results.metric}={best.metrics.get(results.metric)} "
        f"config={best.config}"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    store, spec = _load(args.experiment_dir)
    rows = []
    for trial in store.load_trials():
        rows.append(
            {
                "trial_id": trial.trial_id,
                "status": trial.status.value,
                "config": trial.config,
                "last_result": trial.last_result,
                "checkpoint": trial.checkpoint,
                "error": trial.error,
                "lineage": trial.extra.get("lineage", []),
                "history": store.results(trial.trial_id) if args.history else None,
            }
        )
    out = open(args.output, "w", newline="") if args.output else sys.stdout  # noqa: SIM115
    try:
        if args.format == "json":
            json.dump(
                {"metric": spec["metric"], "mode": spec["mode"], "trials": rows}, out, indent=1, default=repr
            )
            out.write("\n")
        else:
            from dtune.tune.results import Results

            Results(args.experiment_dir, spec["metric"], spec["mode"]).dataframe().to_csv(out, index=False)
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dtune", description="Inspect, resume and export dtune experiments."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="table of an experiment's trials, best first")
    status.add_argument("experiment_dir")
    status.add_argument("--limit", type=int, default=50, help="rows to show (default 50)")
    status.set_defaults(handler=_status)
    resume = commands.add_parser("resume", help="continue an interrupted or crashed experiment")
    resume.add_argument("experiment_dir")
    resume.add_argument("--verbose", type=int, default=2, choices=(0, 1, 2))
    resume.set_defaults(handler=_resume)
    export = commands.add_parser("export", help="write trials and results as CSV or JSON")
    export.add_argument("experiment_dir")
    export.add_argument("--format", choices=("csv", "json"), default="csv")
    export.add_argument("--output", "-o", help="file to write (default: standard output)")
    export.add_argument("--history", action="store_true", help="JSON: include every result of every trial")
    export.set_defaults(handler=_export)
    args = parser.parse_args(argv)
    if not Path(args.experiment_dir).is_dir():
        parser.error(f"{args.experiment_dir} is not a directory")
    try:
        return int(args.handler(args))
    except FileNotFoundError as exc:
        raise SystemExit(f"dtune: {exc}") from exc


if __name__ == "__main__":
    sys.exit(main())
