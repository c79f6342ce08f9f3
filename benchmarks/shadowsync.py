"""ShadowSync vs foreground sync on a CTR workload, on emulated links (unshaped, 1 Gbit/s, 100 Mbit/s).

2 trainers, 1 embedding server (the tables, row updates pushed asynchronously) and 1 sync server
(EASGD's centre; idle in the other arms, so every arm runs on the same topology), each rank in
its own network namespace (``dtune.netem``: veth links, ``tc tbf`` rate limits on every host's access
link, both directions). One-pass training of a DLRM-style model on synthetic CTR data; every
arm trains on the same examples (each trainer on its half) from the same initial model.

Arms: no dense sync (the throughput bound), foreground MA / EASGD / BMUF every k in {1, 10, 100}
steps, their shadow versions (delta apply; MA also with overwrite; paced to a slowdown budget
of 2% (``max_slowdown``: the thread measures training's step rate while it syncs and while it
rests, and syncs as much as the budget allows; 2% leaves room for what it cannot measure, the
cost of the other processes' syncs on shared cores; ``--max-slowdowns 0.05 0.02`` adds a 5%
budget), and synchronous gradient
all-reduce. (Earlier runs also paced to a fixed duty cycle of 0.05 and niced the shadow thread;
both options remain, ``--arms`` does not offer them.)

This machine's speed drifts by 10-25% between runs seconds apart (two no-sync runs of one seed
differed that much), more than the 5% the throughput target allows. So the no-sync bound runs
between every two arms (N, a1, N, a2, ..., N, in an order shuffled per seed) and each arm's
share of it is its rate over the mean of the two no-sync runs that bracket it: a paired ratio
that cancels drift slower than three runs. Reported per arm (median over seeds for rates and
paired ratios, mean for quality): examples/s per trainer and in total, the paired share of
no-sync, syncs/s and the mean gap in steps between two syncs, NE and AUC of the trainers'
replicas on held-out data (mean of the two), and the replicas' relative divergence.

    python benchmarks/shadowsync.py            # full matrix, ~35 minutes on 2 cores
    python benchmarks/shadowsync.py --quick    # smoke run: 1 seed, 2 links, fewer arms
    python benchmarks/shadowsync.py --arms "S-MA" "S-MA max slowdown 2%" --seeds 0 1 --tag pacer

Needs root for the network namespaces; without it, every condition runs on loopback (unshaped)
and the report says so. Results: ``benchmarks/results/shadowsync.{json,md}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
WORLD = 4  # ranks 0, 1: trainers; rank 2: embedding server; rank 3: sync server (EASGD's centre)
SPARSE_LR = 10.0  # SGD on the embedding rows (the loss is a batch mean, so row gradients are small)
DENSE_LR = 0.05  # Adagrad on the dense part
MAX_SLOWDOWNS = (0.02,)  # shadow arms that pace themselves to keep training within x of its rate
NO_SYNC = {"name": "no sync", "kind": "fg", "alg": "none", "k": 1}  # the bound, run between every two arms
WARMUP = {"name": "warm-up", "kind": "fg", "alg": "none", "k": 1}
SERVERS: dict[str, Any] = {"servers": 2, "dedicated_sync_server": True, "sparse_lr": SPARSE_LR}
_DATA: dict[int, Any] = {}  # seed -> (task, training examples, held-out examples), per process


def arms(quick: bool, budgets: tuple[float, ...] = MAX_SLOWDOWNS) -> list[dict[str, Any]]:
    """The arms compared with the no-sync bound (which is not among them: it brackets each)."""
    periods = [10] if quick else [1, 10, 100]
    out: list[dict[str, Any]] = []
    for alg in ("ma", "easgd", "bmuf"):
        out += [{"name": f"FG {alg.upper()} k={k}", "kind": "fg", "alg": alg, "k": k} for k in periods]
    for alg in ("ma", "easgd", "bmuf"):
        out.append({"name": f"S-{alg.upper()}", "kind": "shadow", "alg": alg, "apply": "delta"})
    out.append({"name": "S-MA overwrite", "kind": "shadow", "alg": "ma", "apply": "overwrite"})
    for budget in budgets:
        for alg in ("ma", "easgd", "bmuf"):
            name = f"S-{alg.upper()} max slowdown {budget:.0%}"
            out.append({"name": name, "kind": "shadow", "alg": alg, "apply": "delta", "max_slowdown": budget})
    out.append({"name": "all-reduce", "kind": "fg", "alg": "allreduce", "k": 1})
    return out


# -- worker side (one process per rank, inside its namespace) -----------------------------------
def _strategy(arm: dict[str, Any]) -> Any:
    from dtune.train._shadowsync import ForegroundSync, ShadowSync
    from dtune.train._sync_algorithms import Apply, SyncAlgorithm

    algorithm = SyncAlgorithm(arm["alg"])
    if arm["kind"] == "shadow":
        return ShadowSync(
            algorithm=algorithm,
            apply=Apply(arm["apply"]),
            max_slowdown=arm.get("max_slowdown"),
            **SERVERS,
        )
    return ForegroundSync(algorithm=algorithm, period=arm["k"], **SERVERS)


def _run_arm(
    arm: dict[str, Any], seed: int, cfg: dict[str, Any], trainers_group: Any
) -> dict[str, Any] | None:
    import torch

    from dtune import train
    from dtune.data import SyntheticCTR, auc, normalized_entropy
    from dtune.models import DLRM
    from dtune.runtime import distributed

    if seed not in _DATA:
        task = SyntheticCTR(seed=0)
        train_set = task.sample(cfg["examples"] * 2, seed=1000 + seed)
        _DATA[seed] = (task, train_set, task.sample(cfg["held_out"], seed=2000 + seed))
    task, examples, held_out = _DATA[seed]
    strategy = _strategy(arm)
    model = DLRM(vocab_sizes=task.vocab_sizes, bottom=(64,), top=(256, 128), embedding_dim=16, seed=seed)
    if strategy.is_server:
        strategy.serve(model)
        return None
    dense = [p for n, p in model.named_parameters() if not n.startswith("embeddings")]
    model, optimizer = train.prepare(model, torch.optim.Adagrad(dense, lr=DENSE_LR), strategy=strategy)
    data = examples.shard(strategy.trainer_rank, strategy.trainers)
    if arm is WARMUP or arm["name"] == WARMUP["name"]:
        data = data[: cfg["batch"] * 20]
    distributed.all_reduce_sum_bucketed([torch.zeros(1)], group=trainers_group)  # start together
    start, cpu = time.perf_counter(), time.process_time()
    for batch in data.batches(cfg["batch"]):
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model(batch.dense, batch.sparse), batch.labels
        )
        loss.backward()
        optimizer.step()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    stats = strategy.stats()
    divergence = strategy.replica_divergence()
    with torch.no_grad():
        logits = torch.cat([model(b.dense, b.sparse) for b in held_out.batches(5000)])
    probabilities = torch.sigmoid(logits)
    mine = {
        "examples_per_s": len(data) / seconds,
        "seconds": seconds,
        "cpu_per_wall": cpu / seconds,  # this process's CPU (all its threads) per second of training
        "cpu_ms_per_1k": 1e6 * cpu / len(data),  # CPU cost of training, robust to machine load
        "syncs": stats.syncs,
        "syncs_per_s": stats.syncs / seconds,
        "gap_steps": stats.mean_gap_steps if stats.syncs else None,
        "steps_during_sync": stats.mean_steps_during_sync,
        "duty_cycle": stats.duty_cycle,  # the shadow thread's at the end (paced arms adapt it)
        "divergence": divergence,
        "ne": normalized_entropy(probabilities, held_out.labels),
        "auc": auc(probabilities, held_out.labels),
    }
    both = distributed.all_gather_object(mine, group=trainers_group)
    strategy.close()
    return {"trainers": both}


def worker(args: argparse.Namespace) -> None:
    import torch

    from dtune.runtime import distributed
    from dtune.runtime.distributed import GroupSpec

    torch.set_num_threads(1)
    cfg = json.loads(args.config)
    distributed.init_group(
        GroupSpec(
            rank=args.rank, world_size=WORLD, addr=args.addr, port=args.port, backend="gloo", timeout_s=600
        )
    )
    try:
        trainers_group = distributed.new_group([0, 1])
        _run_arm(WARMUP, 0, cfg, trainers_group)  # first-use costs land here, not on an arm
        runs = []
        for seed in cfg["seeds"]:
            order = list(cfg["arms"])
            random.Random(seed).shuffle(order)  # the same order on every rank; machine noise spreads
            for position, arm in enumerate(bracketed(order)):
                result = _run_arm(arm, seed, cfg, trainers_group)
                if result is not None:
                    runs.append({"arm": arm["name"], "seed": seed, "position": position, **result})
                    if args.rank == 0:
                        print(f"  seed {seed} {arm['name']}: {_brief(result)}", flush=True)
        if args.rank == 0:
            Path(args.out).write_text(json.dumps(runs))
    finally:
        distributed.destroy_group()


def bracketed(order: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``order`` with the no-sync bound before, between and after its arms: N, a1, N, a2, ..., N."""
    return [NO_SYNC, *itertools.chain.from_iterable((arm, NO_SYNC) for arm in order)]


def _rate(run: dict[str, Any]) -> float:
    return statistics.mean(t["examples_per_s"] for t in run["trainers"])


def paired_shares(runs: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """(arm, seed) -> the arm's rate over the mean rate of the two no-sync runs around it."""
    at = {(r["seed"], r["position"]): r for r in runs}
    shares = {}
    for r in runs:
        if r["arm"] == NO_SYNC["name"]:
            continue
        around = [at.get((r["seed"], r["position"] + d)) for d in (-1, 1)]
        bounds = [_rate(b) for b in around if b is not None and b["arm"] == NO_SYNC["name"]]
        if bounds:
            shares[(r["arm"], r["seed"])] = _rate(r) / statistics.mean(bounds)
    return shares


def bound_drift(runs: list[dict[str, Any]]) -> float | None:
    """The median |change| in no-sync rate between two consecutive no-sync runs: the noise floor."""
    at = {(r["seed"], r["position"]): r for r in runs if r["arm"] == NO_SYNC["name"]}
    pairs = [(r, at[(seed, pos + 2)]) for (seed, pos), r in at.items() if (seed, pos + 2) in at]
    changes = [abs(_rate(after) / _rate(before) - 1) for before, after in pairs]
    return statistics.median(changes) if changes else None


def _brief(result: dict[str, Any]) -> str:
    t = result["trainers"]
    rate = sum(x["examples_per_s"] for x in t)
    return f"{rate:.0f} ex/s, {t[0]['syncs_per_s']:.1f} syncs/s, NE {statistics.mean(x['ne'] for x in t):.4f}"


# -- driver side --------------------------------------------------------------------------------
def _condition(rate_mbit: float | None, cfg: dict[str, Any], emulate: bool) -> dict[str, Any]:
    from dtune.runtime.distributed import free_port

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "runs.json"
        port = 29500 + int(time.time()) % 1000
        argv_base = [sys.executable, __file__, "--worker", "--config", json.dumps(cfg), "--out", str(out)]
        start = time.perf_counter()
        link_mbit = None
        if emulate:
            from dtune import netem

            with netem.Network(hosts=WORLD, link=netem.Link(rate_mbit=rate_mbit)) as net:
                if rate_mbit is not None:
                    link_mbit = netem.measure_throughput(
                        net, 0, 1, nbytes=int(rate_mbit * 1e6 / 8 * 0.5)
                    ).wire_mbit
                procs = []
                for r in range(WORLD):
                    argv = [*argv_base, "--rank", str(r), "--addr", net.address(0), "--port", str(port)]
                    procs.append(net.spawn(r, argv, env=net.torch_env(r, port)))
                codes = [p.wait(timeout=cfg["timeout_s"]) for p in procs]
        else:
            port = free_port()
            procs = [
                subprocess.Popen([*argv_base, "--rank", str(r), "--addr", "127.0.0.1", "--port", str(port)])
                for r in range(WORLD)
            ]
            codes = [p.wait(timeout=cfg["timeout_s"]) for p in procs]
        if any(codes) or not out.exists():
            raise RuntimeError(f"a rank failed (exit codes {codes})")
        runs = json.loads(out.read_text())
    return {
        "rate_mbit": rate_mbit,
        "measured_link_mbit": link_mbit,
        "emulated": emulate,
        "seconds": time.perf_counter() - start,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "runs": runs,
    }


def summarise(condition: dict[str, Any], arm_names: list[str]) -> list[dict[str, Any]]:
    shares = paired_shares(condition["runs"])
    rows = []
    for name in arm_names:
        runs = [r for r in condition["runs"] if r["arm"] == name]
        if not runs:
            continue

        def med(key: str, runs: list[dict[str, Any]] = runs) -> float:
            return statistics.median(statistics.mean(t[key] for t in r["trainers"]) for r in runs)

        def mean(key: str, runs: list[dict[str, Any]] = runs) -> float:
            return statistics.mean(statistics.mean(t[key] for t in r["trainers"]) for r in runs)

        gaps = [t["gap_steps"] for r in runs for t in r["trainers"] if t["gap_steps"] is not None]
        per_seed = [shares[(name, r["seed"])] for r in runs if (name, r["seed"]) in shares]
        rows.append({
            "arm": name,
            "per_trainer": med("examples_per_s"),
            "total": statistics.median(sum(t["examples_per_s"] for t in r["trainers"]) for r in runs),
            "syncs_per_s": med("syncs_per_s"),
            "gap_steps": statistics.median(gaps) if gaps else None,
            "ne": mean("ne"),
            "ne_sd": statistics.pstdev([statistics.mean(t["ne"] for t in r["trainers"]) for r in runs]),
            "auc": mean("auc"),
            "divergence": med("divergence"),
            "cpu_per_wall": med("cpu_per_wall"),
            "cpu_ms_per_1k": med("cpu_ms_per_1k"),
            "duty_cycle": statistics.median(t.get("duty_cycle", 1.0) for r in runs for t in r["trainers"]),
            "runs": len(runs),
            "of_no_sync_per_seed": per_seed,
            "of_no_sync": statistics.median(per_seed) if per_seed else 1.0,  # 1.0: the bound itself
        })  # fmt: skip
    return rows


def _label(rate: float | None) -> str:
    return "unshaped" if rate is None else f"{rate:g} Mbit/s"


def checks(table: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The paper's two claims, at this scale, as measured (pass or fail)."""
    lines = []
    for label, rows in table.items():
        shadow = [r for r in rows if r["arm"].startswith("S-")]
        for r in shadow:
            ok = r["of_no_sync"] >= 0.95
            lines.append(
                f"{label}: {r['arm']} runs at {r['of_no_sync']:.1%} of no-sync throughput: "
                f"{'PASS' if ok else 'FAIL'} (target >= 95%)"
            )
        foreground = [r for r in rows if r["arm"].startswith("FG")]
        if foreground and shadow:
            best = min(foreground, key=lambda r: r["ne"])
            for r in shadow:
                rel = (r["ne"] - best["ne"]) / best["ne"]
                lines.append(
                    f"{label}: {r['arm']} NE {r['ne']:.4f} vs best foreground ({best['arm']}) "
                    f"{best['ne']:.4f}: {rel:+.2%} {'PASS' if rel <= 0.005 else 'FAIL'} (target <= +0.5%)"
                )
    labels = list(table)
    for arm in [r["arm"] for r in next(iter(table.values()))] if table else []:
        if not arm.startswith("FG") or len(labels) < 2:
            continue
        rows = [next(r for r in table[lab] if r["arm"] == arm) for lab in labels]
        rates = [r["per_trainer"] for r in rows]
        shares = " -> ".join(f"{r['of_no_sync']:.0%}" for r in rows)
        falling = all(b <= a * 1.02 for a, b in itertools.pairwise(rates))
        lines.append(
            f"{arm}: per-trainer ex/s {' -> '.join(f'{x:.0f}' for x in rates)} as the link slows: "
            f"{'falls' if falling else 'does not fall monotonically'} "
            f"(share of no-sync {shares})"
        )
    return lines


def markdown(report: dict[str, Any]) -> str:
    head = (
        "| link | arm | ex/s per trainer | ex/s total | of no-sync (paired; per seed) | syncs/s | "
        "sync gap (steps) | NE | AUC | divergence | CPU/wall | CPU ms/1k ex | duty at end |\n"
        + "|---" * 13
        + "|"
    )
    lines = [head]
    for label, rows in report["table"].items():
        for r in rows:
            gap = "-" if r["gap_steps"] is None else f"{r['gap_steps']:.2f}"
            seeds = ", ".join(f"{x:.0%}" for x in r["of_no_sync_per_seed"]) or "the bound"
            lines.append(
                f"| {label} | {r['arm']} | {r['per_trainer']:.0f} | {r['total']:.0f} | "
                f"{r['of_no_sync']:.0%} ({seeds}) | "
                f"{r['syncs_per_s']:.1f} | {gap} | "
                f"{r['ne']:.4f} ± {r['ne_sd']:.4f} | {r['auc']:.4f} | {r['divergence']:.2e} | "
                f"{r['cpu_per_wall']:.2f} | {r['cpu_ms_per_1k']:.0f} | {r.get('duty_cycle', 1.0):.2f} |"
            )
    conditions = "\n".join(
        f"- {_label(c['rate_mbit'])}: {'netem namespaces' if c['emulated'] else 'loopback, NOT shaped'}"
        + (f", measured link {c['measured_link_mbit']:.0f} Mbit/s" if c["measured_link_mbit"] else "")
        + f", {c['seconds']:.0f} s, load average (1 min) before {c['load_before'][0]:.1f}, "
        f"after {c['load_after'][0]:.1f}, no-sync rate change between consecutive bound runs "
        f"(median) {bound_drift(c['runs']):.1%}"
        for c in report["conditions"]
    )
    return (
        f"# ShadowSync benchmark ({report['date']})\n\n{report['setup']}\n\nConditions:\n{conditions}\n\n"
        + "\n".join(lines)
        + "\n\nChecks (the paper's claims at small scale):\n"
        + "\n".join(f"- {c}" for c in report["checks"])
        + "\n"
    )


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # so `with netem.Network` tears down on SIGTERM too


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, unshaped and 100 Mbit/s")
    parser.add_argument(
        "--arms",
        nargs="+",
        default=None,
        help="only these arms (names as in the table; 'no sync' always runs)",
    )
    parser.add_argument(
        "--max-slowdowns",
        nargs="+",
        type=float,
        default=list(MAX_SLOWDOWNS),
        help=f"the paced shadow arms' slowdown budgets (default: {' '.join(map(str, MAX_SLOWDOWNS))})",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 2 (--quick: 0)")
    parser.add_argument("--tag", default="", help="results/shadowsync<-tag>.{json,md}")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--addr", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    signal.signal(signal.SIGTERM, _interrupt)
    arm_list = arms(args.quick, tuple(args.max_slowdowns))
    if args.arms:
        unknown = set(args.arms) - {a["name"] for a in arm_list}
        if unknown:
            parser.error(f"unknown arms {sorted(unknown)}; choose from {[a['name'] for a in arm_list]}")
        arm_list = [a for a in arm_list if a["name"] in args.arms]
    cfg = {
        "arms": arm_list,
        "seeds": args.seeds or ([0] if args.quick else [0, 1, 2]),
        # per trainer, one pass: 3-4 s per arm unshaped, long enough for the pacer (~2 s memory) to settle
        "examples": 8_000 if args.quick else 120_000,
        "held_out": 20_000,
        "batch": 256,
        "timeout_s": 600 if args.quick else 1500,
    }
    rates: list[float | None] = [None, 100.0] if args.quick else [None, 1000.0, 100.0]
    emulate = os.geteuid() == 0
    if emulate:
        from dtune import netem

        try:
            netem.require_root()
            netem.require_tools()
        except (PermissionError, netem.NetemUnavailable) as exc:
            print(f"network emulation unavailable ({exc}); running every condition on loopback", flush=True)
            emulate = False
    conditions = []
    for rate in rates if emulate else [None]:
        print(f"{_label(rate)}...", flush=True)
        conditions.append(_condition(rate, cfg, emulate))
    names = [NO_SYNC["name"], *dict.fromkeys(a["name"] for a in arm_list)]
    table = {_label(c["rate_mbit"]): summarise(c, names) for c in conditions}
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "setup": (
            f"2 trainers + 1 embedding server + 1 sync server (EASGD's centre), each in its own network "
            f"namespace; gloo, 1 thread per process, 2 cores shared by all 4 processes. "
            f"DLRM (8 tables, vocab 1e3-1e5, dim 16, bottom 64, top 256-128), Adagrad lr {DENSE_LR} "
            f"(dense), SGD lr {SPARSE_LR} (embedding rows, on the server); {cfg['examples']} examples per "
            f"trainer, one pass, batch {cfg['batch']}; NE/AUC on {cfg['held_out']} held-out examples; "
            f"seeds {cfg['seeds']}. Rates are medians over seeds, NE/AUC means (± sd over seeds)."
        ),
        "config": cfg,
        "conditions": conditions,
        "table": table,
    }
    report["checks"] = checks(table)
    RESULTS.mkdir(exist_ok=True)
    text = markdown(report)
    name = f"shadowsync-{args.tag}" if args.tag else "shadowsync"
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
