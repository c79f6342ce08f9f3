"""Models, data and training loops shared by the K-FAC tests (run in-process and by train.launch)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dtune import train
from dtune.optim import KFAC, Assignment, Method
from dtune.runtime import distributed


def make_cnn(seed: int = 0, inplace: bool = False) -> nn.Module:
    """Conv with and without bias, Linear with and without bias, and a module K-FAC skips."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.Conv2d(4, 6, 3, stride=2, bias=False),
        nn.GroupNorm(2, 6),  # per example, so 1- and 2-worker runs see the same function
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 12),
        nn.ReLU(inplace=inplace),
        nn.Linear(12, 3, bias=False),
    )


def global_batch(step: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(size, 1, 8, 8, generator=generator)
    return x, (x[:, 0, 2:6, 2:6].sum((1, 2)) > 0).long() + (x[:, 0, 0].sum(1) > 1).long()


def local_part(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous share of the global batch (the whole batch with one worker)."""
    x, y = global_batch(step)
    size, rank = distributed.world_size(), distributed.rank()
    return x.chunk(size)[rank], y.chunk(size)[rank]


def kfac_options(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "damping": config.get("damping", 0.05),
        "factor_update_steps": config.get("factor_update_steps", 1),
        "inv_update_steps": config.get("inv_update_steps", 2),
        "kl_clip": config.get("kl_clip"),
        "lr": config.get("lr", 0.1) if config.get("kl_clip") else None,
        "method": Method[config.get("method", "EIGEN")],
        "assignment": Assignment[config.get("assignment", "COMM_OPT")],
        "grad_worker_fraction": config.get("fraction", 0.5),
    }


def trajectory(config: dict[str, Any]) -> dict[str, Any]:
    """``steps`` SGD steps with K-FAC on this rank's share; per-step preconditioned gradients.

    With ``attach`` the preconditioner runs as a step pre-hook of the optimizer returned by
    ``train.prepare`` (what ``prepare(..., preconditioner=)`` does); else ``kfac.step()`` is
    called by hand between backward and ``optimizer.step()``.
    """
    model = make_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if config.get("wrap_first"):  # KFAC given the DDP-wrapped model works the same
        model, optimizer = train.prepare(model, optimizer)
        kfac = KFAC(model, **kfac_options(config))
    else:
        kfac = KFAC(model, **kfac_options(config))
        model, optimizer = train.prepare(model, optimizer)
    if config.get("attach"):
        kfac.attach(optimizer)
    grads, losses = [], []
    for step in range(config["steps"]):
        x, y = local_part(step)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if not config.get("attach"):
            kfac.step()
        grads.append([p.grad.clone() for p in train.unwrap(model).parameters()])
        optimizer.step()
        losses.append(loss.item())
    return {
        "grads": grads,
        "losses": losses,
        "factors": kfac.state_dict(),
        "loads": kfac.plan.loads,
        "rank": distributed.rank(),
    }


def trajectories(config: dict[str, Any]) -> dict[str, Any]:
    """Several ``trajectory`` runs and a learning curve in one worker group (one process start)."""
    return {
        "trajectories": [trajectory({**config, **variant}) for variant in config["variants"]],
        "curve": learning_curve(config) if config.get("curve_steps") else None,
    }


def learning_curve(config: dict[str, Any]) -> list[float]:
    """Full-batch loss of a small classifier trained with K-FAC on a fixed synthetic task."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(512, 10, generator=generator)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3:5].sum(1) > 0.5).long()
    torch.manual_seed(1)
    model: nn.Module = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kfac = KFAC(model, damping=0.03, inv_update_steps=5, kl_clip=0.01)
    model, optimizer = train.prepare(model, optimizer)
    kfac.attach(optimizer)
    losses = []
    for step in range(config["curve_steps"]):
        batch = torch.arange(step * 64, (step + 1) * 64) % 512
        xs, ys = next(train.shard(zip(x[batch].chunk(distributed.world_size()),
                                      y[batch].chunk(distributed.world_size()), strict=True)))  # fmt: skip
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xs), ys).backward()
        optimizer.step()
        with torch.no_grad():
            losses.append(nn.functional.cross_entropy(model(x), y).item())
    return losses
