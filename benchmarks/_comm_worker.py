"""One rank of the compression benchmark, run inside its own network namespace.

Started by ``benchmarks/comm.py`` as ``ip netns exec NS python _comm_worker.py SPEC RANK``: joins
the 2-rank gloo group through ``dtune.runtime.distributed.init_group`` at the address of host
0 on the emulated network, then, seed by seed, trains every method of the spec in the same
processes, taking turns every few steps, and (rank 0) appends one JSON line per run to the
spec's output.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from dtune import comm, train
from dtune.runtime import distributed
from dtune.runtime.distributed import GroupSpec
from tasks import TeacherTask, mlp

WIDTHS = [1024, 1024, 512]


def dtune_compressor(name: str, ratio: float, refresh_every: int) -> comm.Compressor:
    return {
        "dtune_fp16": lambda: comm.FP16(),
        "dtune_bf16": lambda: comm.BF16(),
        "dtune_topk": lambda: comm.TopK(ratio=ratio),
        "dtune_topk2": lambda: comm.TopK(ratio=2 * ratio),
        "dtune_topk_exact": lambda: comm.TopK(ratio=ratio, selection=comm.Selection.EXACT),
        "dtune_randomk": lambda: comm.RandomK(ratio=ratio),
        "dtune_qsgd": lambda: comm.QSGD(levels=7),
        "dtune_efsign": lambda: comm.EFSignSGD(),
        "dtune_powersgd1": lambda: comm.PowerSGD(rank=1),
        "dtune_powersgd4": lambda: comm.PowerSGD(rank=4),
        "dtune_threshold": lambda: comm.Threshold(ratio=ratio, refresh_every=refresh_every),
    }[name]()


def wrap(
    method: str, model: torch.nn.Module, optimizer: Any, seed: int, spec: dict[str, Any]
) -> tuple[Any, Any, comm.Compressor | None]:
    """The model and optimizer a method trains with, and the dtune compressor if it has one."""
    if method.startswith("dtune_"):
        compressor = dtune_compressor(method, spec["ratio"], spec["refresh_every"])
        strategy = train.AllReduce(compression=compressor)
        model, optimizer = train.prepare(model, optimizer, strategy=strategy)
        return model, optimizer, compressor
    # bucket_cap_mb given explicitly, as train.AllReduce does: DDP then keeps this model in one
    # 25 MB bucket after its rebuild (the default also caps a first bucket at 1 MB). One bucket
    # is also what keeps PyTorch's powerSGD_hook correct on gloo: it issues its later
    # all-reduces from future callbacks, and with two buckets the ranks' orders can differ
    # (gloo aborts: "Received data size doesn't match expected size").
    ddp = DistributedDataParallel(model, bucket_cap_mb=25)
    if method == "ddp_fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif method.startswith("ddp_powersgd"):
        state = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=int(method[-1]),
            start_powerSGD_iter=2,  # the smallest allowed with error feedback and warm start
            random_seed=seed,
        )
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif method != "ddp_fp32":
        raise ValueError(f"unknown method {method!r}")
    return ddp, optimizer, None


def tx_bytes() -> int:
    return int(Path("/sys/class/net/dt0/statistics/tx_bytes").read_text())


def accuracy(model: torch.nn.Module, task: TeacherTask, size: int) -> float:
    """Accuracy on the fixed test set, each rank scoring half of it."""
    x, y = task.test_set(size, part=distributed.rank(), parts=distributed.world_size())
    with torch.no_grad():
        correct = torch.tensor([(model(x).argmax(1) == y).sum().item(), len(y)], dtype=torch.float64)
    dist.all_reduce(correct)
    return float(correct[0] / correct[1])


class Run:
    """One method training with one seed: its model, optimizer, schedule and measurements."""

    def __init__(self, method: str, seed: int, task: TeacherTask, spec: dict[str, Any]) -> None:
        self.method, self.seed, self.task, self.spec = method, seed, task, spec
        model = mlp(task.dim, WIDTHS, task.classes, seed=seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=0.9)
        self.model, self.optimizer, self.compressor = wrap(method, model, optimizer, seed, spec)
        total = spec["schedule_steps"]
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
        )
        self.step = 0
        self.times: list[float] = []
        self.losses: list[float] = []
        self.wire: list[int] = []
        self.curve: list[tuple[int, float]] = []

    def advance(self) -> None:
        """One training step, timed; rank 0's bytes sent during it; an evaluation when due."""
        x, y = self.task.batch(step=self.step, rank=distributed.rank(), size=self.spec["batch"])
        sent = tx_bytes()
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        self.times.append(time.perf_counter() - start)
        self.wire.append(tx_bytes() - sent)
        self.losses.append(loss.item())
        self.step += 1
        every = self.spec["eval_every"]
        if every and (self.step % every == 0 or self.step == self.spec["steps"]):
            self.curve.append(
                (self.step, accuracy(train.unwrap(self.model), self.task, self.spec["test_size"]))
            )

    def result(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "seed": self.seed,
            "steps": self.step,
            "step_s": self.times,
            "losses": self.losses,
            "curve": self.curve,
            "wire_tx_bytes": self.wire,  # rank 0's veth transmit counter, per step
            "stats": self.compressor.stats() if self.compressor is not None else {},
            "params": sum(p.numel() for p in train.unwrap(self.model).parameters()),
        }


def interleaved(seed: int, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every method with ``seed``, in blocks of steps taken in turn (the order rotating).

    Load on a shared machine drifts over minutes; taking turns every few steps makes every
    method see the same load, so step times compare across methods. Each method's own steps
    stay in order, so its trajectory is what it would be alone.
    """
    task = TeacherTask(seed=spec["task_seed"])
    runs = [Run(method, seed, task, spec) for method in spec["methods"]]
    block = spec["block"]
    dist.barrier()
    for turn, start in enumerate(range(0, spec["steps"], block)):
        shift = turn % len(runs)
        for run in runs[shift:] + runs[:shift]:
            for _ in range(min(block, spec["steps"] - start)):
                run.advance()
    dist.barrier()
    return [run.result() for run in runs]


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank = int(sys.argv[2])
    torch.set_num_threads(1)
    distributed.init_group(
        GroupSpec(
            rank=rank, world_size=2, addr=spec["addr"], port=spec["port"], backend="gloo", timeout_s=900
        )
    )
    try:
        for seed in spec["seeds"]:
            results = interleaved(seed, spec)
            if rank == 0:
                with open(spec["out"], "a") as out:
                    for result in results:
                        out.write(json.dumps({"condition": spec["condition"], **result}) + "\n")
                for result in results:
                    median = 1000 * sorted(result["step_s"])[len(result["step_s"]) // 2]
                    print(
                        f"  {spec['condition']:>14} seed {seed} {result['method']:<18} {median:8.1f} ms",
                        flush=True,
                    )
    finally:
        distributed.destroy_group()


if __name__ == "__main__":
    main()
