"""Worker loops of the 2-process compression tests (run by ``train.launch``).

Compressors are named here and built in the workers, so configs stay plain data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from dtune import comm, train
from dtune.runtime import distributed

# every compressor at a setting where it loses nothing (rank >= min(n, m) for PowerSGD)
LOSSLESS: dict[str, Callable[[], comm.Compressor]] = {
    "fp32": lambda: comm.Cast(precision=comm.Precision.FP32),
    "topk": lambda: comm.TopK(ratio=1.0),
    "topk_exact": lambda: comm.TopK(ratio=1.0, selection=comm.Selection.EXACT),
    "randomk": lambda: comm.RandomK(ratio=1.0),
    "threshold": lambda: comm.Threshold(ratio=1.0, refresh_every=1),
    "powersgd": lambda: comm.PowerSGD(rank=64, min_compression_rate=0),
}

# every compressor at a setting that loses information (what training uses)
LOSSY: dict[str, Callable[[], comm.Compressor]] = {
    "fp16": lambda: comm.FP16(),
    "bf16": lambda: comm.BF16(),
    "topk": lambda: comm.TopK(ratio=0.05),
    "topk_exact": lambda: comm.TopK(ratio=0.05, selection=comm.Selection.EXACT),
    "randomk": lambda: comm.RandomK(ratio=0.05),
    "qsgd": lambda: comm.QSGD(levels=7, chunk_size=64),
    "qsgd8": lambda: comm.QSGD(levels=127),
    "efsign": lambda: comm.EFSignSGD(),
    "powersgd": lambda: comm.PowerSGD(rank=2),
    "threshold": lambda: comm.Threshold(ratio=0.05, refresh_every=5),
}

IN, HIDDEN, CLASSES = 16, 64, 4


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))


def batch(step: int, rank: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's batch of a fixed task: labels from a fixed random linear teacher."""
    teacher = torch.Generator().manual_seed(12345)
    weights = torch.randn(IN, CLASSES, generator=teacher)
    generator = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(size, IN, generator=generator)
    return x, (x @ weights).argmax(1)


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _everyone(tensor: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(tensor) for _ in range(distributed.world_size())]
    dist.all_gather(out, tensor)
    return out


def _grads(module: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in module.parameters() if p.grad is not None]


def _ddp(module: nn.Module, bucket_mb: float, hook: tuple[Any, Any] | None) -> DistributedDataParallel:
    ddp = DistributedDataParallel(module, bucket_cap_mb=bucket_mb)
    if hook is not None:
        ddp.register_comm_hook(*hook)
    return ddp


def _gradient_steps(model: nn.Module, steps: int) -> list[list[torch.Tensor]]:
    """``steps`` SGD steps on this rank's batches; the (averaged) gradients of every step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for step in range(steps):
        x, y = batch(step, distributed.rank())
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        out.append(_grads(model))
        optimizer.step()
    return out


def lossless_parity(config: dict[str, Any]) -> dict[str, Any]:
    """Per bucket size and lossless compressor: gradients of 3 DDP steps with its hook and without."""
    results = {}
    for bucket_mb in config["bucket_mb"]:
        out: dict[str, Any] = {"plain": _gradient_steps(_ddp(make_model(), bucket_mb, None), 3)}
        for name, make in LOSSLESS.items():
            state, hook = comm.ddp_hook(make())
            out[name] = _gradient_steps(_ddp(make_model(), bucket_mb, (state, hook)), 3)
            out[name + "/stats"] = state.stats()
        results[bucket_mb] = out
    return results


def _torch_bf16_hook(state, bucket):  # unannotated: DDP checks annotations
    # DDP refuses bf16_compress_hook by name without CUDA/NCCL, though gloo reduces bf16 on CPU
    return default_hooks.bf16_compress_hook(state, bucket)


def torch_cast_hooks(config: dict[str, Any]) -> dict[str, Any]:
    """Gradients under PyTorch's fp16/bf16 hooks and under dtune's FP16/BF16."""
    out = {}
    for name, theirs, ours in (
        ("fp16", default_hooks.fp16_compress_hook, comm.FP16()),
        ("bf16", _torch_bf16_hook, comm.BF16()),
    ):
        out[name + "/torch"] = _gradient_steps(_ddp(make_model(), 25, (None, theirs)), 2)
        out[name + "/dtune"] = _gradient_steps(_ddp(make_model(), 25, comm.ddp_hook(ours)), 2)
    # composition by wrappers: PyTorch's fp16 wrapper around a dtune hook (top-k at ratio 1)
    state, hook = comm.ddp_hook(comm.TopK(ratio=1.0))
    out["wrapped"] = _gradient_steps(
        _ddp(make_model(), 25, (state, default_hooks.fp16_compress_wrapper(hook))), 2
    )
    out["plain"] = _gradient_steps(_ddp(make_model(), 25, None), 2)
    out["wrapped/dtype"] = str(state.memory.residuals[0].dtype)
    return out


def crafted_lossless(config: dict[str, Any]) -> dict[str, Any]:
    """QSGD and EF-signSGD on inputs they represent exactly, through CommState.all_reduce."""
    rank = distributed.rank()
    # chunks of 2 with norm 5 and levels 5: every |x| / norm * levels is an integer
    qsgd_input = [torch.tensor([3.0, 4.0, -4.0, 3.0, 0.0, -5.0]) * (rank + 1)]
    qsgd_state = comm.CommState(comm.QSGD(levels=5, chunk_size=2))
    qsgd_want = _everyone(qsgd_input[0].clone())
    qsgd_state.all_reduce(qsgd_input)
    # one magnitude per tensor: the scaled sign is exact
    sign_input = [torch.tensor([1.0, -1.0, 1.0]) * (rank + 2), torch.tensor([[-0.5, 0.5], [0.5, 0.5]])]
    sign_want = [_everyone(t.clone()) for t in sign_input]
    sign_state = comm.CommState(comm.EFSignSGD())
    sign_state.all_reduce(sign_input)
    return {
        "qsgd": (qsgd_input[0], sum(qsgd_want) / 2),
        "sign": [(got, sum(want) / 2) for got, want in zip(sign_input, sign_want, strict=True)],
        "sign_residual": [r.abs().max().item() for r in sign_state.memory.residuals.values()],
    }


def hook_vs_strategy(config: dict[str, Any]) -> dict[str, Any]:
    """Per lossy compressor: gradients of DDP + comm.ddp_hook vs train.AllReduce(compression=...)."""
    bucket_mb = config["bucket_mb"]
    out = {}
    for name, make in LOSSY.items():
        hook_grads = _gradient_steps(_ddp(make_model(), bucket_mb, comm.ddp_hook(make())), 3)
        model = make_model()
        strategy = train.AllReduce(bucket_mb=bucket_mb, compression=make())
        model, _ = train.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), strategy=strategy)
        strategy_grads = _gradient_steps(model, 3)
        out[name] = (hook_grads, strategy_grads, sorted(strategy.state_dict()["hook"]))
    return out


def train_each(config: dict[str, Any]) -> dict[str, Any]:
    """Per lossy compressor: a short training run; losses, and whether replicas agree."""
    steps = config["steps"]
    out: dict[str, Any] = {}
    names = ["none", *LOSSY]
    for name in names:
        runs = []
        for _ in range(2):  # twice from scratch: the second must repeat the first exactly
            compressor = None if name == "none" else LOSSY[name]()
            model = make_model()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            model, optimizer = train.prepare(
                model,
                optimizer,
                strategy=train.AllReduce(bucket_mb=config["bucket_mb"], compression=compressor),
            )
            losses = []
            for step in range(steps):
                x, y = batch(step, distributed.rank())
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            params = _flat(train.unwrap(model))
            stats = compressor.stats() if compressor is not None else {}
            runs.append({"losses": losses, "replicas": _everyone(params), "stats": stats})
        out[name] = runs
    return out
