"""DLCP on emulated links under pressure: bounded loss and priorities vs DDP and compression.

DLCP (Wang et al., "Domain-specific Communication Optimization for Distributed DNN Training")
claims that a bounded-loss, priority-packet transport cuts the tail of gradient communication,
which compression alone cannot. This benchmark runs, in one go, every rank in its own network
namespace (``dtune.netem``) on 100 Mbit/s links, on the teacher-student task of the compression
benchmark (``benchmarks/tasks.py``), and compares

- anchors: DDP fp32 all-reduce, DDP with PyTorch's PowerSGD hook, dtune's best compressor
  (read from ``results/comm.json`` when the compression benchmark has run, else PowerSGD r4);
- DLCP at bounds 0, 1%, 5%, 10% (collective mode), and DLCP 5% carrying that compressor (each
  packet sent twice, ``--comp-copies``; once as an ablation); and DLCP's direct exchange
  carrying it (``Mode.DIRECT``, reliable: each rank sends its packets to every other and sums
  them all itself, one trip per reduction instead of a reduce-scatter and an all-gather);
- ablations at 5%: bound only (no classes, no DSCP), + priority (classes, DSCP, the switch:
  the default), + spraying over 2 paths; and the layer rule reversed (back layers first);

under these conditions:

- ``pressure``: 1% random loss at the receivers and two bounded background bulk TCP flows
  sharing each host's FIFO token bucket with the gradient traffic. 3 seeds, time to target
  accuracy.
- ``pressure_switch`` (the "+ priority" ablation): the same, behind an emulated priority switch
  at each host's egress (htb: a class for DSCP EF/AF41, one for AF31-CS1, one for the rest, each
  with its own tail-drop buffer; the gloo traffic of the anchors is marked AF41 with nftables,
  so the switch favours *all* gradient traffic over the bulk flows, not DLCP's alone). Step
  times, one seed.
- ``loss2``: 2% random loss. ``microburst``: the link rate toggled between 100 and 10 Mbit/s
  every 250 ms by a bounded loop. Step times, one seed.
- ``incast``: 4 workers and 1 parameter server on a bridge (5 hosts), DLCP in PS mode against
  DDP's ring all-reduce among the 4 workers. Step times, one seed.

The links carry jumbo frames (MTU 9000) for every method, so DLCP's packets (8 KiB of payload)
are single datagrams; netem adds the second path, the MTU, the switch and the rate toggling
here, with ``ip``/``tc``/``nft`` on the namespaces it made (all torn down with them).

Reported: step-time CDF (p50, p95, p99, max) of rank 0 (forward + backward with communication
+ optimizer step), time to target accuracy (training time until the held-out accuracy, checked
every ``--eval-every`` steps, first reaches the target; evaluation not counted), final accuracy,
realised loss per class, wire bytes per step (veth counters of rank 0), CPU time spent packing,
NACKs. Needs root.

    python benchmarks/dlcp.py            # everything (~25 min on 2 cores)
    python benchmarks/dlcp.py --quick    # smoke run (~3 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

BULK_PORTS = "{ 5201, 5202, 5203, 5204 }"  # netem's background flows: left unmarked (best effort)
PS_PORT = 7700
ANCHORS = ["ddp_fp32", "ddp_powersgd", "dtune_best"]
CARRYING = ["dlcp5_comp", "dlcp_direct_comp"]  # DLCP carrying the best compressor's payloads
DLCP_MAIN = ["dlcp0", "dlcp1", "dlcp5", "dlcp10", *CARRYING]
ABLATIONS = ["dlcp5_bound_only", "dlcp5_spray2", "dlcp5_back_first", "dlcp5_comp_1copy"]
CONDITIONS = ["pressure", "pressure_switch", "loss2", "microburst", "incast"]


def plan(condition: str, quick: bool) -> tuple[list[str], bool]:
    """The methods a condition runs, and whether with every seed and evaluations (else: timing only)."""
    if condition == "pressure":
        methods = ANCHORS + DLCP_MAIN + ABLATIONS
        return (["ddp_fp32", "ddp_powersgd", "dlcp0", "dlcp5", "dlcp5_spray2"] if quick else methods), True
    if condition == "pressure_switch":  # the "+ priority" ablation: the same pressure, a priority switch
        return [*ANCHORS, "dlcp5_bound_only", "dlcp5", *CARRYING], False
    if condition == "incast":
        return ["ddp_fp32", "ddp_powersgd", "dlcp5", "dlcp_ps0", "dlcp_ps5"], False
    return [*ANCHORS, "dlcp0", "dlcp5", *CARRYING], False


# -- the worker side (runs inside a namespace) ------------------------------------------------


def dlcp_config(method: str, spec: dict[str, Any], world: int) -> Any:
    from dtune.comm import dlcp

    bound = {"dlcp0": 0.0, "dlcp1": 0.01, "dlcp10": 0.10}.get(method, 0.05)
    options: dict[str, Any] = {
        "bound": bound,
        "packet_bytes": spec["packet_bytes"],
        "dscp": True,
        "seed": 0,
        "send_buffer_kb": spec["send_buffer_kb"],
    }
    if "_comp" in method:
        options["compressor"] = best_compressor_object(spec["best"])
        options["packet_bytes"] = spec["comp_packet_bytes"]
        options["copies"] = 1 if method == "dlcp5_comp_1copy" else spec["comp_copies"]
    if method == "dlcp_direct_comp":  # one trip per reduction: every rank sums all packets itself
        options.update(mode=dlcp.Mode.DIRECT, bound=0.0)
    if method == "dlcp5_bound_only":
        options.update(priority=dlcp.PriorityPolicy(classes=2, protected=0.0), dscp=False)
    if method == "dlcp5_back_first":
        options["priority"] = dlcp.PriorityPolicy(layer_rule=dlcp.LayerRule.BACK_FIRST)
    if method == "dlcp5_spray2":
        options.update(
            paths=2, addresses=tuple((f"10.250.0.{r + 1}", f"10.251.0.{r + 1}") for r in range(world))
        )
    if method.startswith("dlcp_ps"):
        options.update(
            mode=dlcp.Mode.PS,
            server_addresses=(((spec["server"], PS_PORT),),),
            rate_mbit=spec["ps_rate_mbit"],
        )
        options["bound"] = 0.0 if method == "dlcp_ps0" else 0.05
    return dlcp.DLCP(**options)


def best_compressor_object(name: str) -> Any:
    from _comm_worker import dtune_compressor

    return dtune_compressor(name, 0.01, 20)


def wrap_method(
    method: str, model: Any, optimizer: Any, seed: int, spec: dict[str, Any]
) -> tuple[Any, Any, Any]:
    """(model, optimizer, thing with stats()) for ``method``."""
    from _comm_worker import wrap
    from dtune import train
    from dtune.runtime import distributed

    if method.startswith("dlcp"):
        transport = dlcp_config(method, spec, distributed.world_size())
        strategy = train.AllReduce(compression=transport)
        model, optimizer = train.prepare(model, optimizer, strategy=strategy)
        if strategy.hook_state is not None:
            strategy.hook_state.bind(train.unwrap(model))
        return model, optimizer, strategy
    if method == "dtune_best":
        return wrap(spec["best"], model, optimizer, seed, spec)
    if method == "ddp_powersgd":
        return wrap(f"ddp_powersgd{spec['psgd_rank']}", model, optimizer, seed, spec)
    return wrap(method, model, optimizer, seed, spec)


def tx_bytes() -> int:
    """IP bytes this host sent, background flows left out (the nftables counter ``grad``)."""
    listing = subprocess.run(
        ["nft", "-j", "list", "counter", "ip", "dtdlcp", "grad"], capture_output=True, text=True
    )
    entries = json.loads(listing.stdout)["nftables"]
    return int(next(e["counter"]["bytes"] for e in entries if "counter" in e))


def run_method(method: str, seed: int, spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from _comm_worker import accuracy
    from dtune import train
    from dtune.comm import dlcp
    from dtune.runtime import distributed
    from tasks import TeacherTask, mlp

    task = TeacherTask(seed=spec["task_seed"])
    steps = spec["steps"]
    model = mlp(task.dim, spec["widths"], task.classes, seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=0.9)
    model, optimizer, owner = wrap_method(method, model, optimizer, seed, spec)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: 0.5 * (1 + math.cos(math.pi * min(s, spec["schedule_steps"]) / spec["schedule_steps"])),
    )
    times: list[float] = []
    nacks: list[float] = []  # DLCP: NACKs rank 0 has sent so far (for its share and its results)
    curve: list[tuple[int, float, float]] = []
    losses: list[float] = []
    dist.barrier()
    wire_start, cpu_start = tx_bytes(), time.process_time()
    for step in range(steps):
        x, y = task.batch(step=step, rank=distributed.rank(), size=spec["batch"])
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        schedule.step()
        times.append(time.perf_counter() - start)
        if method.startswith("dlcp"):
            sent = owner.compression.stats()
            nacks.append(sent.get("dlcp_data_nacks_sent", 0.0) + sent.get("dlcp_agg_nacks_sent", 0.0))
        losses.append(loss.item())
        if spec["eval_every"] and ((step + 1) % spec["eval_every"] == 0 or step + 1 == steps):
            curve.append((step + 1, accuracy(train.unwrap(model), task, spec["test_size"]), sum(times)))
    dist.barrier()
    wire = tx_bytes() - wire_start
    cpu = time.process_time() - cpu_start
    stats: dict[str, float] = {}
    consistent = None
    if method.startswith("dlcp"):
        stats = owner.compression.stats()
        consistent = True
        try:
            dlcp.check_replicas(train.unwrap(model))
        except dlcp.ReplicaDivergence:
            consistent = False
        if owner.hook_state is not None:
            owner.hook_state.close()
    elif owner is not None:
        stats = owner.stats()
    return {
        "method": method,
        "seed": seed,
        "steps": steps,
        "step_s": times,
        "nacks": nacks,
        "losses": losses,
        "curve": curve,
        "wire_tx_bytes": wire,
        "cpu_s": cpu,
        "stats": stats,
        "replicas_identical": consistent,
        "params": sum(p.numel() for p in train.unwrap(model).parameters()),
    }


def worker_main(spec_path: str, rank: int) -> None:
    import torch

    from dtune.runtime import distributed
    from dtune.runtime.distributed import GroupSpec

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    distributed.init_group(
        GroupSpec(
            rank=rank,
            world_size=spec["world"],
            addr=spec["addr"],
            port=spec["port"],
            backend="gloo",
            timeout_s=900,
        )
    )
    try:
        for seed in spec["seeds"]:
            for method in spec["methods"]:
                if method in ABLATIONS and seed != spec["seeds"][0]:
                    continue
                result = run_method(method, seed, spec)
                if rank == 0:
                    with open(spec["out"], "a") as out:
                        out.write(json.dumps({"condition": spec["condition"], **result}) + "\n")
                    times = sorted(result["step_s"])
                    print(
                        f"  {spec['condition']:>10} {method:<17} seed {seed}: p50 "
                        f"{1000 * times[len(times) // 2]:.1f} ms, p99 {1000 * pct(times, 0.99):.1f} ms, "
                        f"acc {result['curve'][-1][1] if result['curve'] else float('nan'):.4f}",
                        flush=True,
                    )
    finally:
        distributed.destroy_group()


def server_main(spec_path: str) -> None:
    """The parameter server of the incast condition: one shard per DLCP PS method, in order."""
    from dtune.comm import dlcp

    spec = json.loads(Path(spec_path).read_text())
    for method in spec["methods"]:
        if not method.startswith("dlcp_ps"):
            continue
        # the workers pace their pushes (incast into this server's port); its pulls go out of
        # its own link, whose full queue blocks it
        config = dataclasses.replace(dlcp_config(method, spec, spec["world"]), rate_mbit=None)
        stats = dlcp.serve(
            config, shard=0, workers=spec["world"], endpoints=[(spec["server"], PS_PORT)], idle_timeout_s=120
        )
        print(f"  server {method}: {json.dumps(stats)}", flush=True)


# -- the driver side --------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def sh(command: str, *tail: str) -> None:
    """Run ``command`` (split on spaces) plus ``tail`` (arguments holding spaces, e.g. nft rules)."""
    argv = [*command.split(), *tail]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


def add_second_path(net: Any, rate_mbit: float, loss: float) -> None:
    """A second veth pair between hosts 0 and 1 (10.251.0.x), shaped and lossy like the first."""
    a, b = net.namespaces
    sh(f"ip link add dt1 netns {a} type veth peer name dt1 netns {b}")
    limit = int(rate_mbit * 1e6 / 8 * 0.1)
    for i, ns in enumerate(net.namespaces):
        sh(f"ip -n {ns} addr add 10.251.0.{i + 1}/24 dev dt1")
        sh(f"ip -n {ns} link set dt1 mtu 9000")
        sh(f"ip -n {ns} link set dt1 up")
        tbf = f"tbf rate {rate_mbit}mbit burst 131072 limit {limit}"
        sh(f"tc -n {ns} qdisc add dev dt1 root handle 10: {tbf}")
        if loss > 0:
            drop = f"numgen random mod 1000000 < {round(loss * 1e6)} drop"
            sh(f"ip netns exec {ns} nft", f'add rule inet dtnetem arriving iifname "dt1" {drop}')


def jumbo(net: Any) -> None:
    """MTU 9000 on every link (DLCP's 8 KiB packets are then single frames; gloo gains too)."""
    for ns in net.namespaces:
        sh(f"ip -n {ns} link set dt0 mtu 9000")
    if net.switch is not None:
        for port in [f"p{i}" for i in range(len(net.namespaces))] + ["br0"]:
            sh(f"ip -n {net.switch} link set {port} mtu 9000")


def priority_switch(net: Any, rate_mbit: float) -> None:
    """htb at each host's egress: 3 classes by DSCP, served by priority, each with its own buffer.

    EF and AF41 (DLCP's classes 0 and 1, retransmissions, control, and the anchors' gloo traffic,
    marked by :func:`count_gradient_bytes`) > AF31/AF21/AF11/CS1 (DLCP's drop-eligible classes 2
    and 3) > the rest (the bulk flows, and unmarked DLCP).
    """
    classes = ((10, 0, 0.4, 524_288), (20, 1, 0.4, 262_144), (30, 2, 0.2, 262_144))
    matches = ((46, 10), (34, 10), (26, 20), (18, 20), (10, 20), (8, 20))
    for ns in net.namespaces:
        sh(f"tc -n {ns} qdisc replace dev dt0 root handle 1: htb default 30")
        rate = f"rate {rate_mbit}mbit ceil {rate_mbit}mbit"
        sh(f"tc -n {ns} class add dev dt0 parent 1: classid 1:1 htb {rate} burst 128k cburst 128k")
        for cid, prio, share, buffer in classes:
            sh(
                f"tc -n {ns} class add dev dt0 parent 1:1 classid 1:{cid} htb rate {rate_mbit * share}mbit "
                f"ceil {rate_mbit}mbit prio {prio} burst 128k cburst 128k"
            )
            sh(f"tc -n {ns} qdisc add dev dt0 parent 1:{cid} handle {cid}: bfifo limit {buffer}")
        for dscp, cid in matches:
            match = f"u32 match ip tos {hex(dscp << 2)} 0xfc flowid 1:{cid}"
            sh(f"tc -n {ns} filter add dev dt0 parent 1: protocol ip prio 1 {match}")


def count_gradient_bytes(net: Any, mark: bool) -> None:
    """Count what each host sends that is not a background flow (nftables counter ``grad``).

    With ``mark``, that TCP traffic (the anchors' gloo) is also marked AF41, DLCP's class 1.
    """
    chain = "add chain ip dtdlcp out { type filter hook output priority 0; policy accept; }"
    tcp = f"meta l4proto tcp tcp dport != {BULK_PORTS} tcp sport != {BULK_PORTS}"
    rules = [
        "add table ip dtdlcp",
        chain,
        "add counter ip dtdlcp grad",
        f"add rule ip dtdlcp out {tcp} {'ip dscp set af41 ' if mark else ''}counter name grad",
        "add rule ip dtdlcp out meta l4proto udp counter name grad",
    ]
    for ns in net.namespaces:
        sh(f"ip netns exec {ns} nft", "; ".join(rules))


class Microbursts:
    """Toggle every host's link rate between ``high`` and ``low`` Mbit/s; bounded, stops on close."""

    def __init__(self, net: Any, high: float, low: float, period_s: float, limit: int) -> None:
        self.net, self.high, self.low, self.period_s, self.limit = net, high, low, period_s, limit
        self.stop = threading.Event()
        self.toggles = 0
        self.thread = threading.Thread(target=self._run, name="microbursts", daemon=True)

    def _set(self, rate: float) -> None:
        for ns in self.net.namespaces:
            subprocess.run(
                [
                    "tc",
                    "-n",
                    ns,
                    "qdisc",
                    "change",
                    "dev",
                    "dt0",
                    "root",
                    "handle",
                    "10:",
                    "tbf",
                    "rate",
                    f"{rate}mbit",
                    "burst",
                    "131072",
                    "limit",
                    str(int(self.high * 1e6 / 8 * 0.1)),
                ],
                capture_output=True,
            )

    def _run(self) -> None:
        while not self.stop.wait(self.period_s) and self.toggles < self.limit:
            self._set(self.low if self.toggles % 2 == 0 else self.high)
            self.toggles += 1
        self._set(self.high)

    def __enter__(self) -> Microbursts:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def run_condition(name: str, spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    from dtune import netem

    hosts = 5 if name == "incast" else 2
    world = 4 if name == "incast" else 2
    rate = 100.0
    loss = {"pressure": 0.01, "pressure_switch": 0.01, "loss2": 0.02}.get(name, 0.0)
    background: tuple[Any, ...] = ()
    if name.startswith("pressure"):
        background = (
            netem.BulkFlow(src=0, dst=1, seconds=timeout_s),
            netem.BulkFlow(src=1, dst=0, seconds=timeout_s),
        )
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="dtune-dlcp-") as tmp:
        spec = {
            **spec,
            "condition": name,
            "out": str(Path(tmp) / "runs.jsonl"),
            "port": 29510,
            "world": world,
        }
        with netem.Network(
            hosts=hosts, link=netem.Link(rate_mbit=rate, loss=loss), background=background
        ) as net:
            jumbo(net)
            if name == "pressure_switch":
                priority_switch(net, rate)
            count_gradient_bytes(net, mark=name == "pressure_switch")
            if any(m == "dlcp5_spray2" for m in spec["methods"]):
                add_second_path(net, rate, loss)
            spec["addr"] = net.address(0)
            spec["server"] = net.address(4) if name == "incast" else ""
            spec_path = Path(tmp) / "spec.json"
            spec_path.write_text(json.dumps(spec))
            env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
            logs = [open(Path(tmp) / f"rank{r}.log", "w") for r in range(hosts)]  # noqa: SIM115
            procs = [
                net.spawn(
                    r,
                    [sys.executable, __file__, "--worker", str(spec_path), str(r)],
                    env={**net.torch_env(r, port=29510), **env},
                    stdout=logs[r],
                    stderr=subprocess.STDOUT,
                )
                for r in range(world)
            ]
            if name == "incast":
                procs.append(
                    net.spawn(
                        4,
                        [sys.executable, __file__, "--serve", str(spec_path)],
                        env=env,
                        stdout=logs[4],
                        stderr=subprocess.STDOUT,
                    )
                )
            bursts = (
                Microbursts(net, rate, 10.0, 0.25, limit=int(timeout_s / 0.25))
                if name == "microburst"
                else None
            )
            deadline = time.monotonic() + timeout_s
            failed, shown = None, 0
            try:
                if bursts is not None:
                    bursts.__enter__()
                while any(p.poll() is None for p in procs[:world]) and failed is None:
                    time.sleep(0.5)
                    bad = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
                    if bad:
                        failed = f"process {bad[0]} exited with {procs[bad[0]].returncode}"
                    elif time.monotonic() > deadline:
                        failed = f"timed out after {timeout_s:.0f} s"
                    progress = (Path(tmp) / "rank0.log").read_text().splitlines(keepends=True)
                    print("".join(progress[shown:]), end="", flush=True)
                    shown = len(progress)
            finally:
                if bursts is not None:
                    bursts.__exit__()
            counters = [net.counters(r) for r in range(hosts)]
            toggles = bursts.toggles if bursts is not None else 0
        for log in logs:
            log.close()
        tails = [(Path(tmp) / f"rank{r}.log").read_text()[-3000:] for r in range(hosts)]
        runs = (
            [json.loads(line) for line in Path(spec["out"]).read_text().splitlines()]
            if Path(spec["out"]).exists()
            else []
        )
    outcome = {
        "runs": runs,
        "counters": counters,
        "load": (load_before, os.getloadavg()[0]),
        "toggles": toggles,
    }
    if failed is not None:
        outcome.update(error=failed, logs=tails)
    elif name == "incast":
        outcome["server_log"] = tails[4][-2000:]
    return outcome


def pick_best_compressor() -> tuple[str, str]:
    """dtune's best compressor at 100 Mbit/s per results/comm.json, else PowerSGD rank 4."""
    path = RESULTS / "comm.json"
    if path.exists():
        rows = json.loads(path.read_text())["summary"]["conditions"].get("100mbit", {})
        timed = {
            m: r["time_to_target_s"]
            for m, r in rows.items()
            if m.startswith("dtune_") and r["time_to_target_s"]
        }
        if timed:
            best = min(timed, key=lambda m: timed[m])
            return best, f"fastest to target at 100 Mbit/s in results/comm.json ({timed[best]:.1f} s)"
    return (
        "dtune_powersgd4",
        "results/comm.json absent: PowerSGD rank 4 (the best at 100 Mbit/s in the research notes)",
    )


def summarize(results: dict[str, Any], warmup: int) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for condition, outcome in results.items():
        rows: dict[str, Any] = {}
        methods = list(dict.fromkeys(r["method"] for r in outcome["runs"]))
        ref = [r for r in outcome["runs"] if r["method"] == "ddp_fp32"]
        target = None
        if ref and ref[0]["curve"]:
            target = round(0.97 * statistics.mean(r["curve"][-1][1] for r in ref), 4)
        for method in methods:
            runs = [r for r in outcome["runs"] if r["method"] == method]
            times = [t for r in runs for t in r["step_s"][warmup:]]
            reach = []
            for r in runs:
                hit = next(((s, t) for s, acc, t in r["curve"] if target is not None and acc >= target), None)
                reach.append(hit)
            steps = sum(r["steps"] for r in runs)
            stats = [r["stats"] for r in runs if r["stats"]]
            row = {
                "seeds": len(runs),
                "p50_ms": 1000 * pct(times, 0.5),
                "p95_ms": 1000 * pct(times, 0.95),
                "p99_ms": 1000 * pct(times, 0.99),
                "max_ms": 1000 * max(times),
                "mean_ms": 1000 * statistics.mean(times),
                "final_acc": statistics.mean(r["curve"][-1][1] for r in runs) if runs[0]["curve"] else None,
                "time_to_target_s": statistics.mean(h[1] for h in reach) if reach and all(reach) else None,
                "reached": sum(1 for h in reach if h),
                "wire_bytes_per_step": sum(r["wire_tx_bytes"] for r in runs) / steps,
                "cpu_ms_per_step": 1000 * sum(r["cpu_s"] for r in runs) / steps,
                "replicas_identical": all(r["replicas_identical"] for r in runs)
                if method.startswith("dlcp") and "ps" not in method
                else None,
            }
            if stats and "dlcp_loss" in stats[0]:
                row["realised_loss"] = statistics.mean(s["dlcp_loss"] for s in stats)
                row["loss_per_class"] = [
                    statistics.mean(s.get(f"dlcp_loss_class{c}", 0.0) for s in stats) for c in range(4)
                ]
                row["pack_cpu_ms_per_step"] = 1000 * sum(s["dlcp_pack_cpu_s"] for s in stats) / steps
                row["nacks_per_step"] = (
                    sum(s.get("dlcp_data_nacks_sent", 0) + s.get("dlcp_agg_nacks_sent", 0) for s in stats)
                    / steps
                )
                row["retransmitted_per_step"] = sum(s.get("dlcp_retransmitted", 0) for s in stats) / steps
            rows[method] = row
        table[condition] = {"target_acc": target, "methods": rows}
    return table


def checks(table: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    out: list[tuple[str, str, bool | None]] = []
    rows = table.get("pressure", {}).get("methods", {})
    anchors = {m: rows[m] for m in ANCHORS if m in rows}
    dlcps = {m: rows[m] for m in DLCP_MAIN if m != "dlcp0" and m in rows}  # bound 0 is not DLCP's claim
    if not anchors or not dlcps:
        return out
    best_anchor = min(anchors, key=lambda m: anchors[m]["p99_ms"])
    for method, row in dlcps.items():
        ratio = row["p99_ms"] / row["p50_ms"]
        out.append((f"pressure: {method} p99/p50 <= 1.3", f"{ratio:.2f}", ratio <= 1.3))
        half = row["p99_ms"] / anchors[best_anchor]["p99_ms"]
        out.append(
            (
                f"pressure: {method} p99 <= 0.5 x best anchor's ({best_anchor})",
                f"{row['p99_ms']:.1f} vs {anchors[best_anchor]['p99_ms']:.1f} ms ({half:.2f}x)",
                half <= 0.5,
            )
        )
    timed = {m: r["time_to_target_s"] for m, r in anchors.items() if r["time_to_target_s"]}
    fp32 = rows.get("ddp_fp32", {}).get("final_acc")
    for method, row in dlcps.items():
        if timed and row["time_to_target_s"]:
            best = min(timed, key=lambda m: timed[m])
            speed = timed[best] / row["time_to_target_s"]
            out.append(
                (
                    f"pressure: {method} time to target >= 1.3x faster than best anchor ({best})",
                    f"{speed:.2f}x ({row['time_to_target_s']:.1f} vs {timed[best]:.1f} s)",
                    speed >= 1.3,
                )
            )
        else:
            out.append(
                (
                    f"pressure: {method} time to target >= 1.3x faster than best anchor",
                    "target not reached by both",
                    False,
                )
            )
        if fp32 is not None and row["final_acc"] is not None:
            gap = 100 * (row["final_acc"] - fp32)
            out.append(
                (
                    f"pressure: {method} final accuracy within 0.5 pp of DDP fp32",
                    f"{gap:+.2f} pp",
                    gap >= -0.5,
                )
            )
    return out


def _fmt(value: float | None, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return "-" if value is None else f"{scale * value:{spec}}{suffix}"


def markdown(table: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        f"# DLCP under pressure ({meta['date']})",
        "",
        f"{meta['params']:,}-parameter MLP on the teacher task, {meta['batch']} samples/rank/step, "
        f"{meta['steps']} steps (pressure, seeds {meta['seeds']}) / {meta['timing_steps']} steps "
        f"(other conditions, seed {meta['seeds'][0]}); 100 Mbit/s access links, MTU 9000; "
        f"DLCP packets of {meta['packet_bytes']} B ({meta.get('comp_packet_bytes', meta['packet_bytes'])} B "
        f"carrying the compressor's payloads, sent {meta.get('comp_copies', 1)} times). "
        "Load average (1 min): "
        f"{meta['load_min']:.2f}-{meta['load_max']:.2f} on {meta['cpus']} CPUs. "
        f"dtune's best compressor: {meta['best']} ({meta['best_why']}).",
        "",
    ]
    header = (
        "| method | seeds | p50 ms | p95 ms | p99 ms | max ms | p99/p50 | time to target s | final acc % "
        "| realised loss | loss per class 0/1/2/3 | wire B/step | pack CPU ms/step | NACKs/step "
        "| replicas equal |"
    )
    for condition, block in table.items():
        target = block["target_acc"]
        title = f"## {condition}" + (f" (target accuracy {target:.4f} = 0.97 x DDP fp32)" if target else "")
        lines += [title, "", header, "|---|" + "---:|" * 9 + "---:|---|---:|---:|---:|---|"]
        for method, r in block["methods"].items():
            classes = (
                "/".join(f"{100 * x:.1f}%" for x in r["loss_per_class"]) if "loss_per_class" in r else "-"
            )
            equal = r["replicas_identical"]
            cells = [
                method,
                str(r["seeds"]),
                f"{r['p50_ms']:.1f}",
                f"{r['p95_ms']:.1f}",
                f"{r['p99_ms']:.1f}",
                f"{r['max_ms']:.1f}",
                f"{r['p99_ms'] / r['p50_ms']:.2f}",
                f"{_fmt(r['time_to_target_s'], '.1f')} ({r['reached']}/{r['seeds']})",
                _fmt(r["final_acc"], ".2f", 100),
                _fmt(r.get("realised_loss"), ".2f", 100, "%"),
                classes,
                f"{r['wire_bytes_per_step']:,.0f}",
                _fmt(r.get("pack_cpu_ms_per_step"), ".2f"),
                _fmt(r.get("nacks_per_step"), ".2f"),
                "-" if equal is None else str(equal),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Targets of the issue", "", "| target | measured | holds |", "|---|---|---|"]
    for what, measured, holds in meta["checks"]:
        lines.append(f"| {what} | {measured} | {'yes' if holds else 'NO'} |")
    for note in meta["notes"]:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def resummarize(path: Path, warmup: int) -> None:
    """Tables and checks again from the raw runs of a results file (same data, current code)."""
    report = json.loads(path.read_text())
    results = {c: {"runs": runs} for c, runs in report["runs"].items()}
    table = summarize(results, warmup)
    meta = {**report["meta"], "checks": checks(table)}
    path.write_text(json.dumps({**report, "meta": meta, "summary": table}, indent=1) + "\n")
    text = markdown(table, meta)
    path.with_suffix(".md").write_text(text)
    print(text)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # so `with Network` tears down on SIGTERM too


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: pressure and incast, few methods and steps"
    )
    parser.add_argument("--conditions", nargs="+", default=CONDITIONS, choices=[*CONDITIONS, "clean"])
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods (all conditions)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=120, help="steps per run in the pressure conditions")
    parser.add_argument("--timing-steps", type=int, default=50, help="steps per run in the other conditions")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--widths", nargs="+", type=int, default=[512, 512])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--packet-bytes", type=int, default=8192)
    parser.add_argument(
        "--comp-packet-bytes",
        type=int,
        default=8192,
        help="DLCP's packet payload when it carries the compressor's (much smaller) payloads",
    )
    parser.add_argument(
        "--comp-copies",
        type=int,
        default=2,
        help="DLCP's copies of each packet when it carries the compressor's payloads",
    )
    parser.add_argument("--send-buffer-kb", type=int, default=128, help="DLCP's socket send buffer")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--test-size", type=int, default=2048)
    parser.add_argument("--timeout", type=float, default=1500, help="seconds per condition")
    parser.add_argument("--out", default="dlcp")
    parser.add_argument(
        "--from-json", default=None, help="only summarize the runs of this results file again"
    )
    args = parser.parse_args()
    if args.from_json:
        resummarize(Path(args.from_json), args.warmup)
        return
    if args.quick:
        args.conditions = ["pressure", "pressure_switch", "incast"]
        args.seeds, args.steps, args.timing_steps, args.eval_every = [0], 30, 10, 10
        args.out = args.out if args.out != "dlcp" else "dlcp_quick"
    only = args.methods
    signal.signal(signal.SIGTERM, _interrupt)
    from dtune import netem

    try:
        netem.require_root()
        netem.require_tools(nft=True)
    except (PermissionError, netem.NetemUnavailable) as exc:
        raise SystemExit(f"benchmarks/dlcp.py: {exc}") from None
    best, why = pick_best_compressor()
    common = {
        "task_seed": 0,
        "batch": args.batch,
        "lr": args.lr,
        "widths": args.widths,
        "packet_bytes": args.packet_bytes,
        "comp_packet_bytes": args.comp_packet_bytes,
        "comp_copies": args.comp_copies,
        "send_buffer_kb": args.send_buffer_kb,
        "test_size": args.test_size,
        "best": best,
        "psgd_rank": 4,
        "ratio": 0.01,
        "refresh_every": 20,
        "ps_rate_mbit": 24.0,
    }
    results: dict[str, Any] = {}
    loads: list[float] = []
    notes: list[str] = []
    started = time.time()
    for condition in args.conditions:
        chosen, full = plan(condition, args.quick)
        spec = {
            **common,
            "methods": chosen,
            "seeds": args.seeds if full else args.seeds[:1],
            "steps": args.steps if full else args.timing_steps,
            "schedule_steps": args.steps,
            "eval_every": args.eval_every if full else 0,
        }
        if only:
            spec["methods"] = [m for m in spec["methods"] if m in only]
        shape = f"{len(spec['methods'])} methods x {len(spec['seeds'])} seed(s) x {spec['steps']} steps"
        print(f"{condition}: {shape}", flush=True)
        outcome = run_condition(condition, spec, args.timeout)
        loads += list(outcome["load"])
        if "error" in outcome:
            print(f"{condition} FAILED: {outcome['error']}\n" + "\n---\n".join(outcome["logs"]), flush=True)
            notes.append(f"{condition} failed: {outcome['error']} (runs finished before it are reported).")
        if condition == "microburst":
            notes.append(
                f"microburst: the rate was toggled {outcome['toggles']} times "
                "(100 <-> 10 Mbit/s, every 250 ms)."
            )
        if condition == "incast" and "server_log" in outcome:
            notes.append(
                "incast: DLCP PS workers are paced at 24 Mbit/s each (4 x 24 < 100 Mbit/s into the server's "
                "port): DLCP's rate control is not implemented, so a fixed pace stands in for it."
            )
        if outcome["runs"]:
            results[condition] = outcome
    table = summarize(results, args.warmup)
    first = next(iter(results.values()))["runs"][0]
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "params": first["params"],
        "batch": args.batch,
        "steps": args.steps,
        "timing_steps": args.timing_steps,
        "seeds": args.seeds,
        "packet_bytes": args.packet_bytes,
        "comp_packet_bytes": args.comp_packet_bytes,
        "comp_copies": args.comp_copies,
        "load_min": min(loads),
        "load_max": max(loads),
        "cpus": os.cpu_count(),
        "best": best,
        "best_why": why,
        "wall_s": time.time() - started,
        "notes": notes,
    }
    meta["checks"] = checks(table)
    RESULTS.mkdir(exist_ok=True)
    report = {
        "meta": meta,
        "args": vars(args),
        "summary": table,
        "runs": {c: o["runs"] for c, o in results.items()},
    }
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(table, meta)
    (RESULTS / f"{args.out}.md").write_text(text)
    print("\n" + text + f"\n(wall time {meta['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID` prints every stack
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--serve":
        server_main(sys.argv[2])
    else:
        main()
