"""Data-parallel step time: dtune ``AllReduce`` vs ``DistributedDataParallel``, in one run.

Same model, data and 2 gloo workers on loopback; ~1M and ~10M parameter MLPs; per-step wall
time on rank 0 (zero_grad, forward, backward with bucketed all-reduce, optimizer step), median
and p99 over ``--steps`` steps after warm-up. The two methods alternate in blocks of 25 steps
inside the same processes, so machine noise hits both alike. Also: samples/s with 1 vs 2 workers.

Note: dtune's AllReduce is built on DDP's reducer (its comm-hook API is where compressors plug
in), so this measures what dtune adds on top: the optimizer step hooks and the strategy layer.

    python benchmarks/dp_step.py [--steps 400] [--batch 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {"1M": (784, [1024, 256], 10), "10M": (2048, [2048, 2048, 512], 10)}
BLOCK = 25


def build(name: str) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    inputs, hidden, outputs = MODELS[name]
    layers: list[nn.Module] = []
    width = inputs
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)


def step_times(config: dict[str, Any]) -> dict[str, Any]:
    """Runs in every worker: alternating blocks of DDP and dtune steps; rank 0 returns timings."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from dtune import train
    from dtune.runtime import distributed

    torch.set_num_threads(1)
    inputs = MODELS[config["model"]][0]
    generator = torch.Generator().manual_seed(distributed.rank())
    x = torch.randn(config["batch"], inputs, generator=generator)
    y = torch.randint(0, 10, (config["batch"],), generator=generator)
    runners = {}
    for method in ("ddp", "dtune"):
        model = build(config["model"])
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        if method == "ddp":
            model = (
                DistributedDataParallel(model, bucket_cap_mb=25) if distributed.world_size() > 1 else model
            )
        else:
            model, optimizer = train.prepare(model, optimizer, strategy=train.AllReduce(bucket_mb=25))
        runners[method] = (model, optimizer)
    times: dict[str, list[float]] = {m: [] for m in runners}
    blocks = (config["steps"] + config["warmup"]) // BLOCK
    for block in range(blocks):
        for method in ("ddp", "dtune") if block % 2 == 0 else ("dtune", "ddp"):
            model, optimizer = runners[method]
            for _ in range(BLOCK):
                start = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
                times[method].append(time.perf_counter() - start)
    warm = config["warmup"]
    return {m: t[warm:] for m, t in times.items()}


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "median_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "steps": len(ordered),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="measured steps per method (default 400)")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--batch", type=int, default=64, help="batch per worker (default 64)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dtune import train

    report: dict[str, Any] = {"batch_per_worker": args.batch, "models": {}}
    lines = [
        "| model | params | workers | DDP median ms | dtune median ms | ratio | DDP p99 ms | dtune p99 ms | "
        "ratio | samples/s (dtune) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in MODELS:
        params = sum(p.numel() for p in build(name).parameters())
        report["models"][name] = {"params": params}
        for workers in (1, 2):
            config = {"model": name, "steps": args.steps, "warmup": args.warmup, "batch": args.batch}
            print(f"{name} ({params / 1e6:.2f}M params), {workers} worker(s)...", flush=True)
            times = train.launch(step_times, workers=workers, config=config).value
            ddp, ours = summary(times["ddp"]), summary(times["dtune"])
            throughput = workers * args.batch / (ours["median_ms"] / 1000)
            row = {
                "ddp": ddp,
                "dtune": ours,
                "median_ratio": ours["median_ms"] / ddp["median_ms"],
                "p99_ratio": ours["p99_ms"] / ddp["p99_ms"],
                "samples_per_s": throughput,
            }
            report["models"][name][f"workers_{workers}"] = row
            lines.append(
                f"| {name} | {params / 1e6:.2f}M | {workers} | {ddp['median_ms']:.2f} | "
                f"{ours['median_ms']:.2f} | {row['median_ratio']:.3f} | {ddp['p99_ms']:.2f} | "
                f"{ours['p99_ms']:.2f} | {row['p99_ratio']:.3f} | {throughput:.0f} |"
            )
        one = report["models"][name]["workers_1"]["samples_per_s"]
        two = report["models"][name]["workers_2"]["samples_per_s"]
        report["models"][name]["scaling_2_vs_1"] = two / one
    RESULTS.mkdir(exist_ok=True)
    text = (
        f"# Data-parallel step time, dtune AllReduce vs DDP ({time.strftime('%Y-%m-%d %H:%M')}, gloo, "
        f"batch {args.batch}/worker, {args.steps} steps)\n\nratio = dtune / DDP (target <= 1.05).\n\n"
        + "\n".join(lines)
        + "\n\nScaling 2 vs 1 worker (samples/s): "
        + ", ".join(f"{n}: {report['models'][n]['scaling_2_vs_1']:.2f}x" for n in MODELS)
        + "\n"
    )
    (RESULTS / "dp_step.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / "dp_step.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
