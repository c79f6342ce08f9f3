"""K-FAC benchmark: dtune.optim.KFAC against SGD and against the public kfac-pytorch, in one run.

1. Small CNN on sklearn's digits (two 3x3 convs with 16 and 32 channels, max-pool, FC 512-64-10;
   batch 64; SGD momentum 0.9, weight decay 5e-4, lr 0.05 x0.1 at epochs 20 and 30), 3 seeds:
   epochs and training seconds to 97% test accuracy for SGD, dtune K-FAC and kfac-pytorch, and
   the per-step overhead of each K-FAC over SGD at factor/eigen intervals 1/10 and 10/100,
   timed in interleaved blocks in two sibling processes (one per library, each with its own SGD
   reference) so that the machine's noise hits all alike. Overhead is the mean step time minus
   SGD's: the means include the amortised decomposition steps.
2. The paper's regime: global batch 4096 over 2 gloo workers (``dtune.train.launch``) on digits
   augmented x16 by random affine warps (21,552 images; 5 steps per epoch), SGD with its
   learning rate tuned in the same run (grid on seed 0; 2 warm-up epochs) against the same SGD
   and schedule with K-FAC (decoupled updates): epochs and training seconds to 98% test accuracy.

kfac-pytorch is not on PyPI. The script installs ``--kfac-pytorch SPEC`` (a pip requirement, a
local source tree or an archive of release 0.4.2) into the throwaway ``benchmarks/.venv-kfac``,
with a ``.pth`` file pointing at this interpreter's site-packages so that both libraries run on
the very same torch build; dtune never imports it. If it cannot be installed the anchor columns
say so and the rest still runs.

    .venv/bin/python benchmarks/kfac.py [--quick] [--kfac-pytorch PATH_OR_REQUIREMENT] [--no-anchor]

Writes ``benchmarks/results/kfac.json`` and ``kfac.md`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import sysconfig
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ANCHOR_VENV = HERE / ".venv-kfac"
TARGET_SMALL = 0.97
TARGET_LARGE = 0.98
SMALL = {"batch": 64, "lr": 0.05, "milestones": (20, 30), "momentum": 0.9, "weight_decay": 5e-4}
# K-FAC settings. Damping is not comparable across the libraries: dtune's factors are those of
# the per-example Fisher (Martens & Grosse), kfac-pytorch's are smaller by the batch size squared
# (G) and the conv output area squared (A and G). 0.1 is the value measured best for kfac-pytorch
# on this task; 0.3 for dtune was picked on seeds 0-2 of this task before this script was written.
DTUNE_DAMPING = 0.3
ANCHOR_DAMPING = 0.1
LARGE = {"global_batch": 4096, "copies": 16, "warmup_epochs": 2, "momentum": 0.9, "weight_decay": 5e-4}
# Picked on exploration runs (seeds 0-1, one process) before this script was written: KL-clip
# 0.01 because a large batch has little gradient noise; factor statistics from 256 examples per
# worker; factors every 5 steps (once an epoch), decompositions every 20.
LARGE_KFAC = {"damping": 0.3, "kl_clip": 0.01, "factor_update_steps": 5, "inv_update_steps": 20,
              "factor_examples": 256}  # fmt: skip


# -- data and model (also imported by the anchor's process: no dtune here) -----------------------


def digits() -> tuple[Any, Any, Any, Any]:
    """Train/test split of sklearn's digits as (N, 1, 8, 8) tensors, standardised per pixel."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    mean, std = x_train.mean(0), x_train.std(0)
    std[std == 0] = 1.0

    def tensor(a: Any) -> Any:
        return torch.tensor((a - mean) / std, dtype=torch.float32).view(-1, 1, 8, 8)

    return tensor(x_train), torch.tensor(y_train), tensor(x_test), torch.tensor(y_test)


def augmented_digits(copies: int, seed: int = 0) -> tuple[Any, Any, Any, Any]:
    """The training images plus ``copies - 1`` random affine warps of each (rotation +-12 deg,
    scale +-10%, shift +-1 px), standardised with the originals' mean and std; test set as is."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    base = torch.tensor(x_train, dtype=torch.float32).view(-1, 1, 8, 8)
    generator = torch.Generator().manual_seed(seed)
    images = base.repeat(copies, 1, 1, 1)
    count = len(images)
    angle = (torch.rand(count, generator=generator) * 2 - 1) * math.radians(12)
    scale = 1 + (torch.rand(count, generator=generator) * 2 - 1) * 0.1
    shift = (torch.rand(count, 2, generator=generator) * 2 - 1) * 0.25  # 1 px of 8 in [-1, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, align_corners=False)
    images[: len(base)] = base
    mean, std = base.mean(), base.std()
    test = (torch.tensor(x_test, dtype=torch.float32).view(-1, 1, 8, 8) - mean) / std
    return (images - mean) / std, torch.tensor(y_train).repeat(copies), test, torch.tensor(y_test)


def cnn(seed: int) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip


def accuracy(model: Any, x: Any, y: Any) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        result = float((model(x).argmax(1) == y).float().mean())
    model.train()
    return result


# -- one library's process: SGD, and K-FAC from dtune or kfac-pytorch ---------------------------


class Runner:
    """A model, its SGD optimizer and, for K-FAC, the library's preconditioner."""

    def __init__(self, library: str, method: str, seed: int, f: int = 1, i: int = 10) -> None:
        import torch

        self.model = cnn(seed)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=SMALL["lr"], momentum=SMALL["momentum"],
                                         weight_decay=SMALL["weight_decay"])  # fmt: skip
        self.preconditioner: Any = None
        if method == "kfac" and library == "dtune":
            from dtune.optim import KFAC

            kfac = KFAC(self.model, damping=DTUNE_DAMPING, factor_update_steps=f, inv_update_steps=i,
                        kl_clip=0.001)  # fmt: skip
            kfac.attach(self.optimizer)  # runs before optimizer.step(), lr for KL-clip from the optimizer
        elif method == "kfac":
            from kfac.preconditioner import KFACPreconditioner

            optimizer = self.optimizer
            self.preconditioner = KFACPreconditioner(
                self.model, factor_update_steps=f, inv_update_steps=i, damping=ANCHOR_DAMPING, kl_clip=0.001,
                lr=lambda _: optimizer.param_groups[0]["lr"],
            )  # fmt: skip

    def step(self, x: Any, y: Any) -> None:
        import torch.nn.functional as F

        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(x), y).backward()
        if self.preconditioner is not None:
            self.preconditioner.step()
        self.optimizer.step()


def serve(library: str) -> None:
    """Answer JSON requests on stdin, one per line (the benchmark's sibling processes)."""
    # this file is benchmarks/kfac.py: its folder must not shadow the `kfac` package
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    x_train, y_train, x_test, y_test = digits()
    batch = SMALL["batch"]
    batches = [
        (x_train[i : i + batch], y_train[i : i + batch]) for i in range(0, len(x_train) - batch + 1, batch)
    ]
    timed: dict[str, tuple[Runner, list[int]]] = {}
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "exit":
            return
        if request["op"] == "time":
            key = f"{request['method']}-{request.get('f')}-{request.get('i')}"
            if key not in timed:
                timed[key] = (
                    Runner(library, request["method"], 0, request.get("f", 1), request.get("i", 10)),
                    [0],
                )
            runner, position = timed[key]
            wall, cpu = [], []
            for _ in range(request["steps"]):
                x, y = batches[position[0] % len(batches)]
                position[0] += 1
                start, start_cpu = time.perf_counter(), time.process_time()
                runner.step(x, y)
                wall.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
            reply: dict[str, Any] = {"wall": wall, "cpu": cpu}
        else:  # "train": epochs on the digits split, accuracy after each
            runner = Runner(library, request["method"], request["seed"])
            generator = torch.Generator().manual_seed(request["seed"])
            accuracies, seconds = [], []
            for epoch in range(request["epochs"]):
                lr = SMALL["lr"] * 0.1 ** sum(epoch >= m for m in SMALL["milestones"])
                for group in runner.optimizer.param_groups:
                    group["lr"] = lr
                order = torch.randperm(len(x_train), generator=generator)
                start = time.perf_counter()
                for i in range(0, len(order), batch):
                    index = order[i : i + batch]
                    runner.step(x_train[index], y_train[index])
                seconds.append(time.perf_counter() - start)
                accuracies.append(accuracy(runner.model, x_test, y_test))
            reply = {"acc": accuracies, "epoch_s": seconds}
        print(json.dumps(reply), flush=True)


class Sibling:
    """A ``serve`` process of one library, driven by JSON lines."""

    def __init__(self, python: str, library: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            [python, __file__, "--serve", library],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def ask(self, **request: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the benchmark's sibling process died on {request}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def close(self) -> None:
        if self.process.poll() is None:
            self.ask_exit()
        self.process.wait(timeout=30)

    def ask_exit(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": "exit"}) + "\n")
        self.process.stdin.flush()


def anchor_python(spec: str) -> tuple[str | None, str]:
    """kfac-pytorch installed into benchmarks/.venv-kfac: (python, description) or (None, why not)."""
    python = ANCHOR_VENV / "bin" / "python"
    probe = [str(python), "-c", "import kfac, importlib.metadata as m; print(m.version('kfac_pytorch'))"]
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(ANCHOR_VENV)], check=True, capture_output=True)
        site = Path(sysconfig.get_paths()["purelib"])
        anchor_site = Path(subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True).stdout.strip())  # fmt: skip
        (anchor_site / "_dtune_same_torch.pth").write_text(f"{site}\n")
    found = subprocess.run(probe, capture_output=True, text=True)
    if found.returncode != 0:
        env = {**os.environ, "SETUPTOOLS_SCM_PRETEND_VERSION": "0.4.2"}
        install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", spec],
                                 capture_output=True, text=True, env=env)  # fmt: skip
        if install.returncode != 0:
            return None, f"kfac-pytorch could not be installed from {spec!r}: {install.stderr.strip()[-300:]}"
        found = subprocess.run(probe, capture_output=True, text=True)
        if found.returncode != 0:
            return (
                None,
                f"kfac-pytorch installed from {spec!r} does not import: {found.stderr.strip()[-300:]}",
            )
    return str(python), f"kfac-pytorch {found.stdout.strip()} (from {spec})"


# -- part 2: the paper's regime, 2 workers ------------------------------------------------------


def large_batch_runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs in each worker of a 2-worker group: the listed runs one after the other."""
    import torch

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    data = augmented_digits(LARGE["copies"])
    return [large_batch_run(run, data) for run in config["runs"]]


def large_batch_run(run: dict[str, Any], data: tuple[Any, Any, Any, Any]) -> dict[str, Any]:
    """SGD (with K-FAC if ``run["kfac"]``) at ``LARGE["global_batch"]`` until the target or the budget."""
    import torch
    import torch.nn.functional as F

    from dtune import train
    from dtune.optim import KFAC
    from dtune.runtime import distributed

    x, y, x_test, y_test = data
    model = cnn(run["seed"])
    optimizer = torch.optim.SGD(model.parameters(), lr=run["lr"], momentum=LARGE["momentum"],
                                weight_decay=LARGE["weight_decay"])  # fmt: skip
    kfac = KFAC(model, **LARGE_KFAC) if run["kfac"] else None
    model, optimizer = train.prepare(model, optimizer)  # dtune's AllReduce strategy (DDP)
    if kfac is not None:
        kfac.attach(optimizer)  # what train.prepare(..., preconditioner=kfac) does
    world, rank = distributed.world_size(), distributed.rank()
    global_batch = LARGE["global_batch"]
    local = global_batch // world
    steps_per_epoch = len(x) // global_batch
    warmup = LARGE["warmup_epochs"] * steps_per_epoch
    generator = torch.Generator().manual_seed(run["seed"])  # the same order on every worker
    accuracies, seconds, step = [], [], 0
    for _ in range(run["max_epochs"]):
        order = torch.randperm(len(x), generator=generator)
        start = time.perf_counter()
        for s in range(steps_per_epoch):
            for group in optimizer.param_groups:  # linear warm-up, then constant
                group["lr"] = run["lr"] * min(1.0, (step + 1) / warmup)
            index = order[s * global_batch + rank * local : s * global_batch + (rank + 1) * local]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
            step += 1
        seconds.append(time.perf_counter() - start)
        accuracies.append(accuracy(train.unwrap(model), x_test, y_test))  # identical replicas: same answer
        if accuracies[-1] >= run["target"] or (len(accuracies) >= 4 and accuracies[-1] < 0.2):
            break  # reached, or diverged (chance level after the warm-up)
    return {**run, "acc": accuracies, "epoch_s": seconds}


# -- orchestration and reporting --------------------------------------------------------------


def load() -> float:
    return os.getloadavg()[0]


def first_reaching(
    accuracies: list[float], seconds: list[float], target: float
) -> tuple[int | None, float | None]:
    """(epochs, summed training seconds) until the accuracy first reached ``target``."""
    for epoch, value in enumerate(accuracies):
        if value >= target:
            return epoch + 1, sum(seconds[: epoch + 1])
    return None, None


def summarise_runs(runs: list[dict[str, Any]], target: float) -> dict[str, Any]:
    reached = [first_reaching(r["acc"], r["epoch_s"], target) for r in runs]
    epochs = [e for e, _ in reached if e is not None]
    secs = [s for _, s in reached if s is not None]
    finals = [r["acc"][-1] for r in runs]
    return {
        "reached": f"{len(epochs)}/{len(runs)}",
        "epochs_per_seed": [e for e, _ in reached],
        "seconds_per_seed": [None if s is None else round(s, 3) for _, s in reached],
        "median_epochs": statistics.median(epochs) if epochs else None,
        "median_seconds": statistics.median(secs) if secs else None,
        "final_acc_median": statistics.median(finals),
        "final_acc_min": min(finals),
        "final_acc_max": max(finals),
    }


def measure_overhead(siblings: dict[str, Sibling], rounds: int, block: int) -> dict[str, Any]:
    """Interleaved blocks of ``block`` steps (a whole number of 10/100 cycles), first round dropped."""
    configs = [("sgd", 1, 10), ("kfac", 1, 10), ("kfac", 10, 100)]
    samples: dict[str, dict[str, list[float]]] = {}
    for round_ in range(rounds + 1):
        order = [(lib, c) for lib in siblings for c in configs]
        for library, (method, f, i) in order if round_ % 2 == 0 else order[::-1]:
            reply = siblings[library].ask(op="time", method=method, f=f, i=i, steps=block)
            if round_ == 0:
                continue  # warm-up
            key = f"{library} {'SGD' if method == 'sgd' else f'K-FAC f{f}/i{i}'}"
            entry = samples.setdefault(key, {"wall": [], "cpu": []})
            entry["wall"] += reply["wall"]
            entry["cpu"] += reply["cpu"]
    table: dict[str, Any] = {}
    for key, entry in samples.items():
        library = key.split(" ")[0]
        sgd = samples[f"{library} SGD"]
        row = {"steps": len(entry["wall"])}
        for clock in ("wall", "cpu"):
            mean, sgd_mean = statistics.mean(entry[clock]), statistics.mean(sgd[clock])
            row[f"{clock}_mean_ms"] = 1000 * mean
            row[f"{clock}_ratio_vs_sgd"] = mean / sgd_mean
            row[f"{clock}_overhead_ms"] = 1000 * (mean - sgd_mean)
        row["wall_median_ms"] = 1000 * statistics.median(entry["wall"])
        table[key] = row
    return table


def part_small(
    siblings: dict[str, Sibling], seeds: int, epochs: int, rounds: int, block: int
) -> dict[str, Any]:
    result: dict[str, Any] = {"load_before": load()}
    print(f"[1/2] per-step overhead: {rounds} interleaved rounds of {block} steps per config...", flush=True)
    result["overhead"] = measure_overhead(siblings, rounds, block)
    result["load_after_overhead"] = load()
    runs: dict[str, list[dict[str, Any]]] = {}
    methods = [("dtune", "sgd", "SGD"), ("dtune", "kfac", "dtune K-FAC f1/i10")]
    if "kfac-pytorch" in siblings:
        methods.append(("kfac-pytorch", "kfac", "kfac-pytorch K-FAC f1/i10"))
    for seed in range(seeds):
        for library, method, label in methods:
            print(f"[1/2] {label}, seed {seed}, {epochs} epochs...", flush=True)
            runs.setdefault(label, []).append(siblings[library].ask(op="train", method=method, seed=seed,
                                                                    epochs=epochs))  # fmt: skip
    result["runs"] = runs
    result["summary"] = {label: summarise_runs(r, TARGET_SMALL) for label, r in runs.items()}
    result["load_after"] = load()
    return result


def part_large(seeds: int, lrs: list[float], max_epochs: int) -> dict[str, Any]:
    from dtune import train

    result: dict[str, Any] = {"load_before": load(), "settings": {**LARGE, "kfac": LARGE_KFAC}}
    base = {"target": TARGET_LARGE, "max_epochs": max_epochs}
    print(f"[2/2] tuning SGD's lr at global batch {LARGE['global_batch']} on 2 workers: {lrs}...", flush=True)
    tuning = train.launch(large_batch_runs, workers=2, config={
        "runs": [{**base, "seed": 0, "lr": lr, "kfac": False} for lr in lrs]}).value  # fmt: skip

    def cost(run: dict[str, Any]) -> float:
        _, seconds = first_reaching(run["acc"], run["epoch_s"], TARGET_LARGE)
        return math.inf if seconds is None else seconds

    best = min(tuning, key=cost)
    result["tuning"] = tuning
    result["lr"] = best["lr"]
    print(f"[2/2] best SGD lr {best['lr']}; SGD and SGD+K-FAC, {seeds} seeds...", flush=True)
    runs = [
        {**base, "seed": seed, "lr": best["lr"], "kfac": kfac}
        for seed in range(seeds)
        for kfac in (False, True)
    ]
    done = train.launch(large_batch_runs, workers=2, config={"runs": runs}).value
    result["runs"] = {
        "SGD (tuned lr)": [r for r in done if not r["kfac"]],
        "SGD + dtune K-FAC": [r for r in done if r["kfac"]],
    }
    result["summary"] = {label: summarise_runs(r, TARGET_LARGE) for label, r in result["runs"].items()}
    result["load_after"] = load()
    return result


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def report(data: dict[str, Any]) -> str:
    small, large = data["small"], data.get("large")
    lines = [
        f"# K-FAC benchmark ({data['date']}, {data['cpus']} CPUs, torch {data['torch']}, {data['anchor']})",
        "",
        f"Load average (1 min) during the run: {', '.join(fmt(v, 1) for v in data['loads'])} "
        f"(another job shares this machine; times are inflated alike for all methods).",
        "",
        "## 1. Digits CNN, batch 64, SGD momentum 0.9, lr 0.05 (x0.1 at epochs 20, 30)",
        "",
        "Per-step time, interleaved blocks in sibling processes (mean includes decomposition steps; "
        "overhead = mean - SGD mean of the same process):",
        "",
        "| config | wall mean ms | wall median ms | ratio vs SGD | overhead ms | CPU mean ms | CPU ratio | "
        "CPU overhead ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, row in sorted(
        small["overhead"].items(), key=lambda item: (item[0].split(" ")[0] != "dtune", item[0])
    ):
        lines.append(
            f"| {key} | {row['wall_mean_ms']:.2f} | {row['wall_median_ms']:.2f} | "
            f"{row['wall_ratio_vs_sgd']:.2f} | "
            f"{row['wall_overhead_ms']:.2f} | {row['cpu_mean_ms']:.2f} | {row['cpu_ratio_vs_sgd']:.2f} | "
            f"{row['cpu_overhead_ms']:.2f} |"
        )
    for setting, value in data["overhead_vs_anchor"].items():
        lines.append(f"\ndtune / kfac-pytorch per-step overhead at {setting}: wall {fmt(value['wall'])}x, "
                     f"CPU {fmt(value['cpu'])}x (target <= 0.8)")  # fmt: skip
    lines += [
        "",
        f"Convergence to {TARGET_SMALL:.0%} test accuracy ({data['seeds']} seeds; "
        "train seconds exclude evaluation):",
        "",
        "| method | reached | epochs (per seed) | median epochs | train-s (per seed) | median train-s | "
        "final acc median (min-max) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, s in small["summary"].items():
        lines.append(
            f"| {label} | {s['reached']} | {s['epochs_per_seed']} | {fmt(s['median_epochs'], 1)} | "
            f"{s['seconds_per_seed']} | {fmt(s['median_seconds'])} | {100 * s['final_acc_median']:.2f} "
            f"({100 * s['final_acc_min']:.2f}-{100 * s['final_acc_max']:.2f}) |"
        )
    if large is not None:
        settings = large["settings"]
        tuned = ", ".join(
            f"lr {r['lr']}: {fmt(first_reaching(r['acc'], r['epoch_s'], TARGET_LARGE)[0])}"
            for r in large["tuning"]
        )
        lines += [
            "",
            f"## 2. Large batch: global {settings['global_batch']} on 2 workers, "
            f"digits x{settings['copies']} augmented, warm-up {settings['warmup_epochs']} epochs",
            "",
            f"SGD lr tuned on seed 0, epochs to {TARGET_LARGE:.0%}: {tuned}; chosen {large['lr']}. "
            f"K-FAC: {settings['kfac']}.",
            "",
            "| method | reached | epochs (per seed) | median epochs | train-s (per seed) | median train-s |",
            "|---|---|---|---|---|---|",
        ]
        for label, s in large["summary"].items():
            lines.append(
                f"| {label} | {s['reached']} | {s['epochs_per_seed']} | {fmt(s['median_epochs'], 1)} | "
                f"{s['seconds_per_seed']} | {fmt(s['median_seconds'])} |"
            )
        lines.append(f"\nK-FAC wall time to target vs tuned SGD: {fmt(data.get('large_time_ratio'))}x "
                     "(target <= 0.8)")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 seed, few epochs (about 2 minutes)"
    )
    parser.add_argument("--kfac-pytorch", default="kfac-pytorch==0.4.2", metavar="SPEC",
                        help="pip requirement or local path of kfac-pytorch 0.4.2 (not on PyPI)")  # fmt: skip
    parser.add_argument("--no-anchor", action="store_true", help="skip kfac-pytorch")
    parser.add_argument("--skip-large", action="store_true", help="only part 1")
    parser.add_argument("--serve", choices=["dtune", "kfac-pytorch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    import torch

    quick = args.quick
    seeds = 1 if quick else 3
    loads = [load()]
    anchor, anchor_note = (
        (None, "kfac-pytorch skipped") if args.no_anchor else anchor_python(args.kfac_pytorch)
    )
    print(anchor_note, flush=True)
    siblings = {"dtune": Sibling(sys.executable, "dtune")}
    if anchor is not None:
        siblings["kfac-pytorch"] = Sibling(anchor, "kfac-pytorch")
    try:
        small = part_small(siblings, seeds, epochs=4 if quick else 40, rounds=1 if quick else 5, block=100)
    finally:
        for sibling in siblings.values():
            sibling.close()
    loads += [small["load_after_overhead"], small["load_after"]]
    data: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "torch": torch.__version__,
        "anchor": anchor_note, "seeds": seeds, "quick": quick, "small": small, "overhead_vs_anchor": {},
    }  # fmt: skip
    for setting in ("f1/i10", "f10/i100"):
        ours, theirs = (small["overhead"].get(f"{lib} K-FAC {setting}") for lib in ("dtune", "kfac-pytorch"))
        if ours is not None and theirs is not None:
            data["overhead_vs_anchor"][setting] = {
                clock: ours[f"{clock}_overhead_ms"] / theirs[f"{clock}_overhead_ms"]
                for clock in ("wall", "cpu")
            }
    if not args.skip_large:
        lrs = [0.1] if quick else [0.05, 0.1, 0.2, 0.4]
        large = part_large(seeds, lrs, max_epochs=2 if quick else 30)
        loads.append(large["load_after"])
        data["large"] = large
        sgd, kfac = (large["summary"][k]["median_seconds"] for k in ("SGD (tuned lr)", "SGD + dtune K-FAC"))
        data["large_time_ratio"] = None if sgd is None or kfac is None else kfac / sgd
    data["loads"] = loads
    text = report(data)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kfac.json").write_text(json.dumps(data, indent=1) + "\n")
    (RESULTS / "kfac.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
