"""Gradient compression on emulated links: dtune's compressors vs DDP's hooks, 2 ranks, one run.

Each rank runs in its own network namespace (``dtune.netem``), joined by a veth link that is
left unshaped, or limited to 1 Gbit/s or 100 Mbit/s by a token bucket, optionally with 1%
random loss at the receivers or a background bulk TCP flow in each direction. Methods: DDP
fp32 all-reduce, DDP's fp16 and PowerSGD (rank 1, 4) hooks (the anchors), and every dtune
compressor through ``train.AllReduce(compression=...)``. The task is a generated
teacher-student classification (``benchmarks/tasks.py``) learned by a 1.65M-parameter MLP
(64-1024-1024-512-10, as in the research notes), 32 samples per rank per step, SGD with
momentum and a cosine schedule.

How it measures (say so when quoting it):
- Accuracy runs train every method for ``--steps`` steps with each of ``--seeds`` seeds on the
  unshaped link, evaluating on a fixed held-out set of ``--test-size`` samples.
- On the shaped links each method trains ``--timing-steps`` steps (seed 0, same schedule): the
  computation is identical on every link (gloo over TCP is reliable, everything is seeded), so
  the losses must repeat the unshaped run's bit for bit, which is checked and reported; only
  time differs. Time to target = steps to reach the target accuracy (unshaped runs, mean over
  seeds) x mean step time measured on that link.
- All methods of a seed train in the same two processes, taking turns every ``--block``
  steps (the order rotating), so that the drifting load of a shared machine hits them alike.
- Step time: rank 0, zero_grad + forward + backward (with DDP's communication) + optimizer
  step, without the first ``--warmup`` steps. Wire bytes: what rank 0's veth interface
  transmitted during its steps, headers included (with background flows, theirs too). The
  target accuracy is ``--target-fraction`` of DDP fp32's mean final accuracy, unless
  ``--target`` gives one.

Needs root (network namespaces); nftables is installed with apt-get when the loss condition
needs it and it is missing (or that condition is skipped, saying why).

    python benchmarks/comm.py                     # full matrix (~20 min on 2 quiet cores)
    python benchmarks/comm.py --quick             # smoke run (~2 min)
    python benchmarks/comm.py --quick --conditions unshaped --methods ddp_fp32 dtune_qsgd
    python benchmarks/comm.py --conditions unshaped 100mbit --methods ddp_fp32 dtune_topk
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dtune import netem

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORKER = HERE / "_comm_worker.py"

CONDITIONS: dict[str, dict[str, Any]] = {
    "unshaped": {"link": netem.Link(), "background": ()},
    "1gbit": {"link": netem.Link(rate_mbit=1000), "background": ()},
    "100mbit": {"link": netem.Link(rate_mbit=100), "background": ()},
    "100mbit_loss1": {"link": netem.Link(rate_mbit=100, loss=0.01), "background": ()},
    "100mbit_bg": {
        "link": netem.Link(rate_mbit=100),
        "background": (netem.BulkFlow(src=0, dst=1), netem.BulkFlow(src=1, dst=0)),
    },
}
ANCHORS = ["ddp_fp32", "ddp_fp16", "ddp_powersgd1", "ddp_powersgd4"]
DTUNE = [
    "dtune_fp16", "dtune_bf16", "dtune_topk", "dtune_topk2", "dtune_topk_exact", "dtune_randomk",
    "dtune_qsgd", "dtune_efsign", "dtune_powersgd1", "dtune_powersgd4", "dtune_threshold",
]  # fmt: skip
SPARSIFIERS_CLOSE_TO_FP32 = [
    "dtune_topk", "dtune_topk2", "dtune_threshold", "dtune_powersgd1", "dtune_powersgd4",
]  # fmt: skip


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # so `with Network` tears down on SIGTERM too


def ensure_nft(install: bool) -> str | None:
    """None when nftables is usable; otherwise why the loss condition is skipped."""
    if shutil.which("nft"):
        return None
    if not install:
        return "nftables is not installed (--no-install given)"
    if shutil.which("apt-get") is None:
        return "nftables is not installed and apt-get is not available to install it"
    print("installing nftables (apt-get install -y nftables) for the loss condition...", flush=True)
    done = subprocess.run(["apt-get", "install", "-y", "nftables"], capture_output=True, text=True)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True)
        done = subprocess.run(["apt-get", "install", "-y", "nftables"], capture_output=True, text=True)
    return None if shutil.which("nft") else f"installing nftables failed: {done.stderr.strip()[-300:]}"


def run_condition(name: str, spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Both ranks of one condition in their namespaces; the runs rank 0 wrote, and load."""
    config = CONDITIONS[name]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="dtune-comm-") as tmp:
        spec = {**spec, "condition": name, "out": str(Path(tmp) / "runs.jsonl"), "port": 29500}
        with netem.Network(hosts=2, link=config["link"], background=config["background"]) as net:
            spec["addr"] = net.address(0)
            spec_path = Path(tmp) / "spec.json"
            spec_path.write_text(json.dumps(spec))
            env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
            logs = [open(Path(tmp) / f"rank{r}.log", "w") for r in range(2)]  # noqa: SIM115
            procs = [
                net.spawn(r, [sys.executable, str(WORKER), str(spec_path), str(r)],
                          env={**net.torch_env(r), **env}, stdout=logs[r], stderr=subprocess.STDOUT)
                for r in range(2)
            ]  # fmt: skip
            deadline = time.monotonic() + timeout_s
            failed, shown = None, 0
            while any(p.poll() is None for p in procs) and failed is None:
                time.sleep(0.5)
                bad = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
                if bad:
                    failed = f"rank {bad[0]} exited with {procs[bad[0]].returncode}"
                elif time.monotonic() > deadline:
                    failed = f"timed out after {timeout_s:.0f} s"
                progress = (Path(tmp) / "rank0.log").read_text().splitlines(keepends=True)
                print("".join(progress[shown:]), end="", flush=True)
                shown = len(progress)
            counters = [net.counters(r) for r in range(2)]
        for log in logs:
            log.close()
        if failed is not None:
            tails = [(Path(tmp) / f"rank{r}.log").read_text()[-3000:] for r in range(2)]
            return {"error": failed, "logs": tails, "runs": [], "load": (load_before, os.getloadavg()[0])}
        runs = [json.loads(line) for line in Path(spec["out"]).read_text().splitlines()]
    return {"runs": runs, "counters": counters, "load": (load_before, os.getloadavg()[0])}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def steps_to(curve: list[list[float]], target: float) -> int | None:
    return next((int(step) for step, acc in curve if acc >= target), None)


def summarize(results: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Per condition and method: step times, wire bytes, time to target; accuracy per method."""
    full = {(r["method"], r["seed"]): r for r in results["unshaped"]["runs"]}
    methods = [m for m in args.methods if any(k[0] == m for k in full)]
    accuracy: dict[str, Any] = {}
    for method in methods:
        runs = [full[(method, s)] for s in args.seeds if (method, s) in full]
        finals = [r["curve"][-1][1] for r in runs]
        accuracy[method] = {
            "final_acc_mean": statistics.mean(finals),
            "final_acc_sd": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "final_acc": finals,
            "curves": [r["curve"] for r in runs],
            "stats": runs[0]["stats"],
        }
    if "ddp_fp32" not in accuracy:
        raise SystemExit("the accuracy runs need ddp_fp32 (the reference for the target)")
    target = args.target or round(args.target_fraction * accuracy["ddp_fp32"]["final_acc_mean"], 4)
    for acc in accuracy.values():
        reached = [steps_to(c, target) for c in acc["curves"]]
        acc["steps_to_target"] = reached
        acc["steps_to_target_mean"] = (
            statistics.mean(reached) if reached and all(s is not None for s in reached) else None
        )
    table: dict[str, dict[str, Any]] = {}
    for condition, outcome in results.items():
        table[condition] = {}
        for method in methods:
            runs = [r for r in outcome["runs"] if r["method"] == method]
            if not runs:
                continue
            times = [t for r in runs for t in r["step_s"][args.warmup :]]
            mean_s = statistics.mean(times)
            reached = accuracy[method]["steps_to_target_mean"]
            reference = full.get((method, runs[0]["seed"]))
            same = None
            if condition != "unshaped" and reference is not None:
                count = len(runs[0]["losses"])
                same = runs[0]["losses"] == reference["losses"][:count]
            table[condition][method] = {
                "p50_ms": 1000 * percentile(times, 0.5),
                "p99_ms": 1000 * percentile(times, 0.99),
                "mean_ms": 1000 * mean_s,
                "wire_bytes_per_step": statistics.mean(
                    b for r in runs for b in r["wire_tx_bytes"][args.warmup :]
                ),
                "time_to_target_s": reached * mean_s if reached is not None else None,
                "same_trajectory_as_unshaped": same,
                "measured_steps": len(times),
            }
    return {"target_acc": target, "accuracy": accuracy, "conditions": table}


def checks(summary: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """The issue's targets, each with what was measured and whether it holds."""
    out: list[tuple[str, str, bool | None]] = []
    table, accuracy = summary["conditions"], summary["accuracy"]
    slow = table.get("100mbit", {})
    ours = {
        m: v["time_to_target_s"] for m, v in slow.items() if m.startswith("dtune_") and v["time_to_target_s"]
    }
    anchors = {m: slow[m]["time_to_target_s"] for m in ("ddp_powersgd1", "ddp_powersgd4") if m in slow}
    if ours and anchors and slow.get("ddp_fp32", {}).get("time_to_target_s"):
        best = min(ours, key=lambda m: ours[m])
        psgd = min(v for v in anchors.values() if v is not None)
        fp32 = slow["ddp_fp32"]["time_to_target_s"]
        out.append((
            "100 Mbit/s: best dtune compressor reaches the target at least as fast as DDP+PowerSGD",
            f"{best} {ours[best]:.1f} s vs best DDP PowerSGD {psgd:.1f} s", ours[best] <= psgd,
        ))  # fmt: skip
        out.append((
            "100 Mbit/s: best dtune compressor >= 10x faster to target than DDP fp32",
            f"{fp32 / ours[best]:.1f}x ({fp32:.1f} s vs {ours[best]:.1f} s)", fp32 / ours[best] >= 10,
        ))  # fmt: skip
    fast = table.get("unshaped", {})
    if "ddp_fp32" in fast:
        base = fast["ddp_fp32"]["p50_ms"]
        for method, row in fast.items():
            if method.startswith("dtune_"):
                ratio = row["p50_ms"] / base
                out.append((f"unshaped: {method} step time <= 1.5x DDP fp32", f"{ratio:.2f}x", ratio <= 1.5))
    if "ddp_fp32" in accuracy:
        ref = accuracy["ddp_fp32"]["final_acc_mean"]
        for method in SPARSIFIERS_CLOSE_TO_FP32:
            if method in accuracy:
                gap = 100 * (accuracy[method]["final_acc_mean"] - ref)
                out.append(
                    (f"final accuracy of {method} within 0.5 pp of fp32", f"{gap:+.2f} pp", gap >= -0.5)
                )
    return out


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        f"# Gradient compression on emulated links ({meta['date']})",
        "",
        f"2 ranks, one per network namespace; {meta['params']:,}-parameter MLP on the teacher task; "
        f"{meta['batch']} samples/rank/step; accuracy runs: {meta['steps']} steps x seeds {meta['seeds']}; "
        f"shaped links: {meta['timing_steps']} timed steps (seed 0). Load average (1 min) during the run: "
        f"{meta['load_min']:.2f}-{meta['load_max']:.2f} on {meta['cpus']} CPUs.",
        "",
        f"Kernel: {meta['capabilities']}",
        "",
        f"Target accuracy: {summary['target_acc']:.4f} ({meta['target_rule']}).",
        "",
        "## Accuracy (unshaped runs; identical on every link)",
        "",
        "| method | final acc (mean ± sd) | steps to target | payload B/step | compression "
        "| compress ms/step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method, acc in summary["accuracy"].items():
        stats = acc["stats"]
        steps = acc["steps_to_target_mean"]
        payload = f"{stats['comm_bytes_sent_per_step']:,.0f}" if stats else "-"
        ratio = f"{stats['comm_compression_ratio']:.1f}x" if stats else "-"
        cost = f"{stats['comm_compress_ms_per_step']:.2f}" if stats else "-"
        lines.append(
            f"| {method} | {100 * acc['final_acc_mean']:.2f} ± {100 * acc['final_acc_sd']:.2f} | "
            f"{'not reached' if steps is None else f'{steps:.0f}'} | {payload} | {ratio} | {cost} |"
        )
    for condition, rows in summary["conditions"].items():
        lines += ["", f"## {condition}", ""]
        if CONDITIONS[condition]["background"]:
            lines += ["Wire bytes include the background flows sent from rank 0's namespace.", ""]
        lines += [
            "| method | p50 ms | p99 ms | wire B/step | time to target s | vs DDP fp32 | same trajectory |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        base = rows.get("ddp_fp32", {}).get("time_to_target_s")
        for method, row in rows.items():
            tta = row["time_to_target_s"]
            speedup = f"{base / tta:.1f}x" if tta and base else "-"
            same = {None: "(reference)", True: "yes", False: "NO"}[row["same_trajectory_as_unshaped"]]
            lines.append(
                f"| {method} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
                f"{row['wire_bytes_per_step']:,.0f} | "
                f"{'-' if tta is None else f'{tta:.1f}'} | {speedup} | {same} |"
            )
    lines += ["", "## Targets of the issue", "", "| target | measured | holds |", "|---|---|---|"]
    for what, measured, holds in meta["checks"]:
        lines.append(f"| {what} | {measured} | {'yes' if holds else 'NO'} |")
    for note in meta["notes"]:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 conditions, 4 methods, 1 seed")
    parser.add_argument("--conditions", nargs="+", choices=list(CONDITIONS), default=list(CONDITIONS))
    parser.add_argument(
        "--methods", nargs="+", choices=ANCHORS + DTUNE, default=None, help="default: all (--quick: four)"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="steps of the accuracy runs")
    parser.add_argument("--timing-steps", type=int, default=35, help="steps per method on shaped links")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of step times")
    parser.add_argument("--batch", type=int, default=32, help="samples per rank per step")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument(
        "--ratio", type=float, default=0.01, help="top-k/random-k/threshold ratio (dtune_topk2: twice it)"
    )
    parser.add_argument("--refresh-every", type=int, default=20, help="DCT threshold refresh interval")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument(
        "--block", type=int, default=5, help="steps a method takes before the next one's turn"
    )
    parser.add_argument("--test-size", type=int, default=2048)
    parser.add_argument("--target", type=float, default=None, help="target accuracy (default: relative)")
    parser.add_argument("--target-fraction", type=float, default=0.97, help="target = this x fp32 final acc")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per condition")
    parser.add_argument("--no-install", action="store_true", help="never apt-get install nftables")
    parser.add_argument("--out", default="comm", help="results/<out>.json and .md")
    args = parser.parse_args()
    if args.quick:
        args.conditions = [c for c in args.conditions if c in ("unshaped", "100mbit")] or ["unshaped"]
        args.methods = args.methods or ["ddp_fp32", "ddp_powersgd1", "dtune_topk", "dtune_powersgd1"]
        args.seeds, args.steps, args.timing_steps, args.eval_every = [0], 60, 10, 20
        args.out = args.out if args.out != "comm" else "comm_quick"
    args.methods = args.methods or ANCHORS + DTUNE
    if "unshaped" not in args.conditions:
        args.conditions.insert(0, "unshaped")  # accuracy and time-to-target come from it
    if "ddp_fp32" not in args.methods:
        args.methods.insert(0, "ddp_fp32")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        netem.require_root()
        netem.require_tools()
    except (PermissionError, netem.NetemUnavailable) as exc:
        raise SystemExit(f"benchmarks/comm.py: {exc}") from None
    notes = []
    if "100mbit_loss1" in args.conditions:
        why = ensure_nft(install=not args.no_install)
        if why is not None:
            args.conditions.remove("100mbit_loss1")
            notes.append(f"100mbit_loss1 skipped: {why}.")
    capabilities = netem.probe()
    print(f"network emulation here: {capabilities.describe()}", flush=True)
    common = {
        "methods": args.methods, "task_seed": 0, "batch": args.batch, "lr": args.lr, "ratio": args.ratio,
        "refresh_every": args.refresh_every, "test_size": args.test_size, "schedule_steps": args.steps,
        "block": args.block,
    }  # fmt: skip
    results: dict[str, Any] = {}
    loads: list[float] = []
    started = time.time()
    for condition in args.conditions:
        if condition == "unshaped":
            spec = {**common, "seeds": args.seeds, "steps": args.steps, "eval_every": args.eval_every}
        else:
            spec = {**common, "seeds": args.seeds[:1], "steps": args.timing_steps, "eval_every": 0}
        count = f"{len(spec['methods'])} methods x {len(spec['seeds'])} seed(s) x {spec['steps']} steps"
        print(f"{condition}: {count}", flush=True)
        outcome = run_condition(condition, spec, args.timeout)
        loads += list(outcome["load"])
        if "error" in outcome:
            print(f"{condition} FAILED: {outcome['error']}\n" + "\n---\n".join(outcome["logs"]), flush=True)
            notes.append(f"{condition} failed: {outcome['error']}.")
            if condition == "unshaped":
                raise SystemExit("the unshaped accuracy runs failed; nothing to report")
            continue
        results[condition] = outcome
    summary = summarize(results, args)
    params = results["unshaped"]["runs"][0]["params"]
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "params": params,
        "batch": args.batch,
        "steps": args.steps,
        "seeds": args.seeds,
        "timing_steps": args.timing_steps,
        "load_min": min(loads),
        "load_max": max(loads),
        "cpus": os.cpu_count(),
        "capabilities": capabilities.describe(),
        "target_rule": f"--target {args.target}"
        if args.target
        else f"{args.target_fraction} x DDP fp32's mean final accuracy",
        "wall_s": time.time() - started,
        "notes": notes,
    }
    meta["checks"] = checks(summary)
    RESULTS.mkdir(exist_ok=True)
    raw = {cond: outcome["runs"] for cond, outcome in results.items()}
    report = {"meta": meta, "args": vars(args), "summary": summary, "runs": raw}
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(summary, meta)
    (RESULTS / f"{args.out}.md").write_text(text)
    print("\n" + text + f"\n(wall time {meta['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
