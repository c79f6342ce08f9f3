"""Codistillation vs all-reduce: the claims of Sodhani et al. on a small task, in one run.

"A Closer Look at Codistillation for Distributed Training" (arXiv 2010.02838) reports that two
codistilled models at batch b match one all-reduce model at batch 2b (same number of steps)
only once the regularisation is accounted for (weight decay lowered at the learning-rate decays,
milestones shifted later); that with constant weight decay codistillation is ~2 points worse,
with higher training loss and parameters closer to their initialisation; that accuracy is
nearly flat in the exchange period; and that on a fraction of the data codistillation beats
all-reduce. This script measures each claim with dtune on 2 gloo workers:

- all-reduce: ``train.AllReduce`` over 2 workers, batch b each (global 2b), lr 2*eta (linear
  scaling, as the paper's 0.1*b/256), constant weight decay, milestones at K/3, 2K/3, 8K/9
  (the paper's 15/30/40 of 45 epochs);
- codistillation: ``Codistillation(models=2)``, one worker per model, batch b, lr eta, K steps,
  period T in {1, 10, 50, 250}, with the paper's recipe (weight decay wd, wd/10, 0 at the first
  two decays; milestones moved by (3, 8, 4)/45 of K, i.e. 18/38/44 of 45);
- codistillation with constant weight decay (T = 50, "out of the box");
- alpha = 0 (independent training at batch b, recipe as above): the control;
- all-reduce and codistillation (T = 50, recipe) on a small subset of the training data.

Every arm runs the same paired seeds (initialisation and batch order). Reported per arm: test
accuracy and full-training-set loss (mean over the arm's models), distance of the parameters
from their initialisation, bytes each worker handed to collectives, extra forward passes.

    .venv/bin/python benchmarks/codistillation.py            # full run
    .venv/bin/python benchmarks/codistillation.py --quick    # smoke test, a minute or two
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
PERIODS = (1, 10, 50, 250)


@dataclass(frozen=True)
class Arm:
    name: str
    strategy: str = "codistillation"  # or "allreduce"
    period: int = 50
    alpha: float = 1.0
    recipe: bool = True  # the paper's weight-decay schedule and milestone shift; else constant
    subset: bool = False


def arms() -> list[Arm]:
    return [
        Arm("all-reduce", strategy="allreduce", recipe=False),
        *[Arm(f"codistillation T={t}", period=t) for t in PERIODS],
        Arm("codistillation T=50, constant WD", recipe=False),
        Arm("alpha=0 (independent), T=50", alpha=0.0),
        Arm("all-reduce, subset", strategy="allreduce", recipe=False, subset=True),
        Arm("codistillation T=50, subset", subset=True),
    ]


@dataclass
class Setup:
    steps: int
    batch: int
    lr: float
    weight_decay: float
    seeds: list[int]
    subset: float
    task: str
    width: int
    arms: list[Arm] = field(default_factory=arms)


def load_task(task: str, subset: bool, fraction: float) -> tuple[Any, Any, Any, Any]:
    """Standardised train/test tensors; the test third and the subset are fixed across seeds."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits, make_classification

    if task == "digits":
        x, y = load_digits(return_X_y=True)
    else:  # a harder generated task: 10 classes, overlapping clusters, 5% label noise
        x, y = make_classification(
            n_samples=3000, n_features=40, n_informative=20, n_redundant=10, n_classes=10,
            n_clusters_per_class=2, class_sep=1.0, flip_y=0.05, random_state=0,
        )  # fmt: skip
    order = np.random.default_rng(0).permutation(len(x))
    test, train = order[: len(x) // 3], order[len(x) // 3 :]
    if subset:
        train = train[: int(len(train) * fraction)]
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6

    def tensor(a: Any) -> Any:
        return torch.tensor((a - mean) / std, dtype=torch.float32)

    return tensor(x[train]), torch.tensor(y[train]), tensor(x[test]), torch.tensor(y[test])


def mlp(inputs: int, width: int, seed: int) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )


class CountingAllReduce:
    """A DDP communication hook that all-reduces as DDP does and counts the bytes it hands over."""

    def __init__(self) -> None:
        self.bytes = 0

    def ddp_hook(self) -> tuple[Any, Any]:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):  # unannotated: DDP checks hook annotations against its own types
            self.bytes += bucket.buffer().numel() * bucket.buffer().element_size()
            return allreduce_hook(None, bucket)

        return self, hook


def run_arm(arm: Arm, seed: int, setup: Setup) -> dict[str, float]:
    """One training run on this worker; every worker calls it with the same arguments."""
    import torch
    from torch.nn import functional

    from dtune import train
    from dtune.runtime import distributed
    from dtune.train._codistillation import Codistillation
    from dtune.train._schedules import CodistillationRecipe

    x_train, y_train, x_test, y_test = load_task(setup.task, arm.subset, setup.subset)
    k = setup.steps
    milestones = (k // 3, 2 * k // 3, 8 * k // 9)
    allreduce = arm.strategy == "allreduce"
    lr = setup.lr * (2 if allreduce else 1)  # linear scaling: all-reduce's global batch is 2b
    if arm.recipe:
        shift = tuple(round(k * d / 45) for d in (3, 8, 4))
        wd = setup.weight_decay
        recipe = CodistillationRecipe(
            lr=lr,
            milestones=milestones,
            milestone_shift=shift,
            weight_decay=(wd, wd / 10, 0.0),
            total_steps=k,
        )
    else:
        recipe = CodistillationRecipe(lr=lr, milestones=milestones, weight_decay=setup.weight_decay)
    counter = CountingAllReduce()
    strategy: Any
    if allreduce:
        strategy, index = train.AllReduce(compression=counter), 0
    else:
        strategy = Codistillation(alpha=arm.alpha, period=arm.period, models=2)
        index = strategy.model_index
    model = mlp(x_train.shape[1], setup.width, seed=1000 * seed + index)
    init = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model, optimizer = train.prepare(model, optimizer, strategy=strategy)
    generator = torch.Generator().manual_seed(1000 * seed + distributed.rank())
    start = time.perf_counter()
    for step in range(k):
        batch = torch.randint(0, len(x_train), (setup.batch,), generator=generator)
        x, y = x_train[batch], y_train[batch]
        recipe.apply(optimizer, step)
        outputs = model(x)
        loss = functional.cross_entropy(outputs, y)
        if not allreduce:
            loss = strategy.loss(loss, outputs, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    module = train.unwrap(model).eval()
    with torch.no_grad():
        accuracy = (module(x_test).argmax(1) == y_test).float().mean().item()
        train_loss = functional.cross_entropy(module(x_train), y_train).item()
        final = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    result = {
        "test_acc": 100 * accuracy,
        "train_loss": train_loss,
        "param_distance": (final - init).norm().item(),
        "seconds": seconds,
    }
    if allreduce:
        result.update(bytes_sent=float(counter.bytes), extra_forward_passes=0.0, extra_forward_s=0.0)
    else:
        metrics = strategy.metrics()
        result.update(
            bytes_sent=metrics["codistill_bytes_sent"],
            extra_forward_passes=metrics["codistill_extra_forward_passes"],
            extra_forward_s=metrics["codistill_extra_forward_s"],
        )
        strategy.close()
    per_worker = distributed.all_gather_object(result)
    # the arm's models: one for all-reduce (replicas agree), one per worker for codistillation
    models = per_worker[:1] if allreduce else per_worker
    return {key: statistics.fmean(m[key] for m in models) for key in result}


def run_all(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs in both workers: every arm for every seed, in the same order."""
    import torch

    from dtune.runtime import distributed

    torch.set_num_threads(1)
    fields = {key: value for key, value in config.items() if key != "progress"}
    setup = Setup(**{**fields, "arms": [Arm(**a) for a in config["arms"]]})
    rows = []
    for arm in setup.arms:
        for seed in setup.seeds:
            rows.append({"arm": arm.name, "seed": seed, **run_arm(arm, seed, setup)})
            if config.get("progress") and distributed.rank() == 0:
                print(f"  {arm.name:34s} seed {seed}: acc {rows[-1]['test_acc']:.2f}", flush=True)
    return rows


def _paired(rows: list[dict[str, Any]], arm: str, base: str, key: str) -> tuple[float, float]:
    """Mean and standard error of the per-seed difference ``arm - base`` of ``key``."""
    by_seed = {r["seed"]: r[key] for r in rows if r["arm"] == base}
    diffs = [r[key] - by_seed[r["seed"]] for r in rows if r["arm"] == arm]
    sem = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return statistics.fmean(diffs), sem


def summarise(rows: list[dict[str, Any]], setup: Setup) -> tuple[dict[str, Any], str]:
    names = [a.name for a in setup.arms]
    table: dict[str, dict[str, float]] = {}
    for name in names:
        mine = [r for r in rows if r["arm"] == name]
        table[name] = {
            key: statistics.fmean(r[key] for r in mine) for key in mine[0] if key not in ("arm", "seed")
        }
        table[name]["test_acc_std"] = statistics.pstdev(r["test_acc"] for r in mine)
        base = "all-reduce, subset" if "subset" in name else "all-reduce"
        table[name]["acc_vs_allreduce"], table[name]["acc_vs_allreduce_sem"] = _paired(
            rows, name, base, "test_acc"
        )
        table[name]["bytes_ratio"] = table[base]["bytes_sent"] / max(table[name]["bytes_sent"], 1.0)
    lines = [
        "| arm | test acc % (std) | vs all-reduce, paired (pp ± s.e.) | final train loss | |θ-θ0| | "
        "MB sent/worker | all-reduce bytes / arm bytes | extra fwd passes | extra fwd time % | s/run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        t = table[name]
        vs = (
            "—"
            if name.startswith("all-reduce")
            else f"{t['acc_vs_allreduce']:+.2f} ± {t['acc_vs_allreduce_sem']:.2f}"
        )
        lines.append(
            f"| {name} | {t['test_acc']:.2f} ({t['test_acc_std']:.2f}) | {vs} | {t['train_loss']:.4f} | "
            f"{t['param_distance']:.2f} | {t['bytes_sent'] / 1e6:.2f} | {t['bytes_ratio']:.1f} | "
            f"{t['extra_forward_passes']:.0f} | {100 * t['extra_forward_s'] / t['seconds']:.1f} | "
            f"{t['seconds']:.1f} |"
        )
    claims = check_claims(table, rows)
    lines += [
        "",
        "Claims (the paper's, as falsifiable targets on this task; ± is one paired standard error):",
        "",
    ]
    lines += [f"- {'MET' if ok else 'NOT MET'}: {text}" for text, ok in claims]
    return {"arms": table, "claims": [{"claim": c, "met": ok} for c, ok in claims]}, "\n".join(lines)


def check_claims(t: dict[str, dict[str, float]], rows: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    """Each claim with the numbers it rests on; "visibly" means more than one paired s.e. away."""
    base, const, sched = t["all-reduce"], t["codistillation T=50, constant WD"], t["codistillation T=50"]
    sub = t["codistillation T=50, subset"]
    accs = [t[f"codistillation T={p}"]["test_acc"] for p in PERIODS]
    ratios = [t[f"codistillation T={p}"]["bytes_ratio"] / p for p in PERIODS]
    gain, gain_sem = _paired(rows, "codistillation T=50", "alpha=0 (independent), T=50", "test_acc")

    def vs(arm: dict[str, float]) -> str:
        return f"{arm['acc_vs_allreduce']:+.2f} ± {arm['acc_vs_allreduce_sem']:.2f} pp"

    return [
        (
            f"with the recipe, codistillation (T=50) within 1 pp of all-reduce: {vs(sched)}",
            abs(sched["acc_vs_allreduce"]) <= 1.0,
        ),
        (
            f"constant WD: visibly worse than all-reduce: {vs(const)}",
            const["acc_vs_allreduce"] + const["acc_vs_allreduce_sem"] < 0,
        ),
        (
            f"constant WD: higher final train loss than all-reduce: {const['train_loss']:.4f} vs "
            f"{base['train_loss']:.4f} (recipe: {sched['train_loss']:.4f})",
            const["train_loss"] > base["train_loss"],
        ),
        (
            "constant WD: parameters closer to initialisation than all-reduce: "
            f"{const['param_distance']:.2f} vs {base['param_distance']:.2f} "
            f"(recipe: {sched['param_distance']:.2f})",
            const["param_distance"] < base["param_distance"],
        ),
        (
            f"accuracy roughly flat across T in {PERIODS}: range {max(accs) - min(accs):.2f} pp "
            "(target <= 1)",
            max(accs) - min(accs) <= 1.0,
        ),
        (f"on the subset, codistillation >= all-reduce: {vs(sub)}", sub["acc_vs_allreduce"] >= 0),
        (
            "bytes reduced by about the period: (all-reduce bytes / codistillation bytes) / T = "
            + ", ".join(f"{r:.2f}" for r in ratios),
            all(0.5 <= r <= 2.0 for r in ratios),
        ),
        (
            f"(control) distillation helps: codistillation T=50 vs alpha=0, paired: {gain:+.2f} ± "
            f"{gain_sem:.2f} pp",
            gain - gain_sem > 0,
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 seeds, 250 steps")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3000, help="K, optimizer steps per model")
    parser.add_argument("--batch", type=int, default=32, help="b, batch per worker")
    parser.add_argument("--lr", type=float, default=0.05, help="eta, codistillation's base lr")
    parser.add_argument("--weight-decay", type=float, default=5e-3)
    parser.add_argument("--subset", type=float, default=0.15, help="fraction of the training set")
    parser.add_argument("--task", choices=("generated", "digits"), default="generated")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--from-json", type=Path, help="re-summarise the rows of an earlier run's JSON")
    args = parser.parse_args()
    if args.from_json is not None:
        resummarise(args.from_json)
        return
    if args.quick:
        args.seeds, args.steps = 2, 250
    from dtune import train

    setup = Setup(
        steps=args.steps, batch=args.batch, lr=args.lr, weight_decay=args.weight_decay,
        seeds=list(range(args.seeds)), subset=args.subset, task=args.task, width=args.width,
    )  # fmt: skip
    config = {**asdict(setup), "progress": True}
    load_before = os.getloadavg()
    started = time.time()
    print(f"{len(setup.arms)} arms x {len(setup.seeds)} seeds, K={setup.steps}, b={setup.batch}", flush=True)
    rows = train.launch(run_all, workers=2, config=config).value
    elapsed = time.time() - started
    load_after = os.getloadavg()
    write(
        setup,
        config,
        rows,
        elapsed,
        (load_before, load_after),
        "codistillation_quick" if args.quick else "codistillation",
    )


def resummarise(path: Path) -> None:
    """Rebuild the table and claims from the rows an earlier run stored (nothing is re-measured)."""
    stored = json.loads(path.read_text())
    config = stored["setup"]
    fields = {key: value for key, value in config.items() if key != "progress"}
    setup = Setup(**{**fields, "arms": [Arm(**a) for a in config["arms"]]})
    loads = tuple(tuple(x) for x in stored["load_average"])
    finished = stored.get("finished") or time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
    write(setup, config, stored["rows"], stored["wall_s"], loads, path.stem, finished)


def write(
    setup: Setup,
    config: dict[str, Any],
    rows: list[dict[str, Any]],
    elapsed: float,
    loads: tuple[Any, Any],
    stem: str,
    finished: str | None = None,
) -> None:
    load_before, load_after = loads
    finished = finished or time.strftime("%Y-%m-%d %H:%M")
    report, table = summarise(rows, setup)
    header = (
        f"# Codistillation vs all-reduce ({finished}, 2 gloo workers)\n\n"
        f"Task: {setup.task} ({'sklearn load_digits' if setup.task == 'digits' else 'make_classification'}), "
        f"MLP {setup.width}x{setup.width}, K={setup.steps} steps, b={setup.batch}, eta={setup.lr}, "
        f"wd={setup.weight_decay}, subset={setup.subset}, seeds={setup.seeds} (paired). "
        f"Wall {elapsed / 60:.1f} min; load average {load_before[0]:.2f} at start, "
        f"{load_after[0]:.2f} at end (2 cores).\n\n"
    )
    text = header + table + "\n"
    RESULTS.mkdir(exist_ok=True)
    payload = {
        "setup": config,
        "finished": finished,
        "load_average": [load_before, load_after],
        "wall_s": elapsed,
        "rows": rows,
        **report,
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
