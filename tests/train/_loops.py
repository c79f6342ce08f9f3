"""Training loops run by worker processes in the data-parallel tests."""

from __future__ import annotations

import os
import signal
import time

import torch
from torch import nn

import dtune
from dtune import train
from dtune.runtime import distributed


def make_model(seed: int = 0, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(8, 16)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.Tanh(), nn.Linear(16, 3)]
    return nn.Sequential(*layers)


def global_batch(step: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(size, 8, generator=generator), torch.randint(0, 3, (size,), generator=generator)


def local_part(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = global_batch(step)
    return next(
        train.shard(zip(x.chunk(distributed.world_size()), y.chunk(distributed.world_size()), strict=True))
    )


def gradients(config):
    """One backward pass on this rank's half of a global batch; rank 0 returns the gradients."""
    model, _ = train.prepare(make_model(), torch.optim.SGD(make_model().parameters(), lr=0.1))
    x, y = local_part(0)
    nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def trained_parameters(config):
    """``config["steps"]`` SGD steps under the configured strategy; returns rank 0's parameters."""
    model = make_model(batchnorm=config.get("batchnorm", False))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy = train.LocalSGD(period=config["period"]) if config["strategy"] == "local" else train.AllReduce()
    model, optimizer = train.prepare(model, optimizer, strategy=strategy)
    for step in range(config["steps"]):
        x, y = local_part(step)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    module = train.unwrap(model)
    return {
        "params": [p.detach().clone() for p in module.parameters()],
        "buffers": [b.clone() for b in module.buffers()],
        "strategy": train.strategy_of(model).state_dict(),
        "context": train.context(),
    }


def reporting(config):
    for step in range(3):
        dtune.report({"step": step, "rank": distributed.rank(), "world": distributed.world_size()})
    return "finished"


def failing(config):
    model, _ = train.prepare(make_model(), torch.optim.SGD(make_model().parameters(), lr=0.1))
    if distributed.rank() == config["bad_rank"]:
        if config["how"] == "raise":
            raise ValueError("rank-specific failure")
        if config["how"] == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(3600)  # "hang": never reaches the collective below
    x, y = local_part(0)
    nn.functional.cross_entropy(model(x), y).backward()  # all-reduce: waits for every rank
    return "unreachable for the others"


def digits_like(config):
    """A small data-parallel trial: reports accuracy on a fixed synthetic task every epoch."""
    ctx = train.context()
    model = make_model(seed=config.get("seed", 0))
    model, optimizer = train.prepare(model, torch.optim.SGD(model.parameters(), lr=config["lr"]))
    checkpoint = dtune.get_checkpoint()
    start = 0
    if checkpoint is not None:
        state = checkpoint.to_dict()
        train.unwrap(model).load_state_dict(state["model"])
        start = state["epoch"]
    for epoch in range(start, config["epochs"]):
        for step in range(4):
            x, y = local_part(epoch * 4 + step)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        time.sleep(config.get("sleep", 0))
        x, y = global_batch(10_000, 256)
        with torch.no_grad():
            acc = (model(x).argmax(1) == y).float().mean().item()
        state = {"model": train.unwrap(model).state_dict(), "epoch": epoch + 1}
        checkpoint = dtune.Checkpoint.from_dict(state) if ctx.is_main else None
        dtune.report({"acc": acc, "world": ctx.world_size}, checkpoint=checkpoint)
