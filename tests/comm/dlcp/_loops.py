"""Worker loops of the 2-process DLCP tests (run by ``train.launch``; configs are plain data)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dtune import comm, train
from dtune.comm import dlcp
from dtune.runtime import distributed
from tests.comm._loops import CLASSES, HIDDEN, IN, batch  # the same teacher task


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES)
    )


def config_of(spec: dict[str, Any]) -> dlcp.DLCP:
    """A DLCP config from plain data (enums and injections named in the spec)."""
    spec = dict(spec)
    if "mode" in spec:
        spec["mode"] = dlcp.Mode(spec["mode"])
    if "loss" in spec:
        loss = dict(spec["loss"])
        if loss.get("classes") is not None:
            loss["classes"] = frozenset(loss["classes"])
        if "kinds" in loss:
            loss["kinds"] = frozenset(dlcp.Kind[k] for k in loss["kinds"])
        spec["loss"] = dlcp.LossInjection(**loss)
    if "priority" in spec:
        priority = dict(spec["priority"])
        if "layer_rule" in priority:
            priority["layer_rule"] = dlcp.LayerRule(priority["layer_rule"])
        spec["priority"] = dlcp.PriorityPolicy(**priority)
    if spec.get("compressor") == "fp16":
        spec["compressor"] = comm.FP16()
    elif spec.get("compressor") == "powersgd":
        spec["compressor"] = comm.PowerSGD(rank=2)
    return dlcp.DLCP(**spec)


def _steps(model: nn.Module, steps: int, lr: float = 0.1, check: bool = False) -> dict[str, Any]:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    grads, losses, checksums = [], [], []
    for step in range(steps):
        x, y = batch(step, distributed.rank())
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        grads.append([p.grad.detach().clone() for p in model.parameters()])
        losses.append(loss.item())
        optimizer.step()
        if check:
            checksums.append(dlcp.check_replicas(train.unwrap(model)))
    return {"grads": grads, "losses": losses, "checksums": checksums}


def parity(config: dict[str, Any]) -> dict[str, Any]:
    """Gradients of a few DDP steps: plain all-reduce, and DLCP with each spec of ``config``."""
    steps, bucket_mb = config["steps"], config.get("bucket_mb", 0.01)
    plain = _steps(DistributedDataParallel(make_model(), bucket_cap_mb=bucket_mb), steps)
    out: dict[str, Any] = {"plain": plain["grads"]}
    for name, spec in config["specs"].items():
        compressor = config_of(spec).compressor
        if compressor is not None:  # the same compressor over gloo: what DLCP at bound 0 must equal
            reference = DistributedDataParallel(make_model(), bucket_cap_mb=bucket_mb)
            reference.register_comm_hook(*comm.ddp_hook(compressor))
            out[name + "/reference"] = _steps(reference, steps)["grads"]
        ddp = DistributedDataParallel(make_model(), bucket_cap_mb=bucket_mb)
        state, hook = config_of(spec).ddp_hook()
        with state:
            state.bind(ddp.module)
            ddp.register_comm_hook(state, hook)
            run = _steps(ddp, steps, check=True)
            out[name] = run["grads"]
            out[name + "/stats"] = state.stats()
            out[name + "/log"] = state.loss_log
    out["threads"] = sorted(t.name for t in threading.enumerate())
    return out


def rank_input(rank: int, step: int, numel: int) -> torch.Tensor:
    """Rank ``rank``'s tensor at ``step``: known to every process, so results can be recomputed."""
    generator = torch.Generator().manual_seed(7919 * step + rank)
    return torch.randn(numel, generator=generator)


def lossy(config: dict[str, Any]) -> dict[str, Any]:
    """Reductions of known tensors over DLCP: outputs, contributor bitmaps, statistics, threads."""
    before = {t.name for t in threading.enumerate()}
    out: dict[str, Any] = {}
    for name, spec in config["specs"].items():
        state, _ = config_of(spec).ddp_hook()
        with state:
            runs = []
            for step in range(config["steps"]):
                tensor = rank_input(distributed.rank(), step, config["numel"])
                state.all_reduce([tensor])
                runs.append((tensor, state.communicator.masks[(0, 0)].copy()))
            out[name] = runs
            out[name + "/stats"] = state.stats()
            out[name + "/log"] = state.loss_log
            out[name + "/endpoints"] = [n.transport.endpoints for n in state.communicator.topology.nodes]
    out["new_threads"] = sorted({t.name for t in threading.enumerate()} - before)
    return out


def everyones_results(config: dict[str, Any]) -> dict[str, Any]:
    """Reductions of known tensors over DLCP; every rank's outputs, gathered (for > 2 ranks)."""
    state, _ = config_of(config["spec"]).ddp_hook()
    with state:
        outputs = []
        for step in range(config["steps"]):
            tensor = rank_input(distributed.rank(), step, config["numel"])
            state.all_reduce([tensor])
            outputs.append(tensor)
        stats = state.stats()
    return {"outputs": distributed.all_gather_object(outputs), "stats": stats}


def starvation(config: dict[str, Any]) -> dict[str, Any]:
    """Constant inputs, the lowest class always dropped: what each coordinate received over time."""
    spec, steps, numel = config["spec"], config["steps"], config["numel"]
    state, _ = config_of(spec).ddp_hook()
    with state:
        # a layer map in which the packets of the back half belong to the last "layer"
        state.communicator.layers[0] = (np.array([numel // 2, numel]), np.array([0, 1]), 2)
        total = torch.zeros(numel)
        delivered = None
        for _ in range(steps):
            tensor = rank_input(distributed.rank(), 0, numel)
            state.all_reduce([tensor])
            total += tensor
            everyone = state.communicator.masks[(0, 0)] == 3  # both ranks' values arrived
            delivered = everyone if delivered is None else delivered | everyone
        return {"total": total, "delivered": delivered, "stats": state.stats()}


def train_run(config: dict[str, Any]) -> dict[str, Any]:
    """Training with train.AllReduce(compression=DLCP(...)) under injected loss; replica checks."""
    spec, steps = config["spec"], config["steps"]
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    transport = config_of(spec)
    strategy = train.AllReduce(bucket_mb=0.01, compression=transport)
    model, optimizer = train.prepare(model, optimizer, strategy=strategy)
    state = strategy.hook_state
    state.bind(train.unwrap(model))
    losses, checksums = [], []
    for step in range(steps):
        x, y = batch(step, distributed.rank())
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        checksums.append(dlcp.check_replicas(train.unwrap(model)))  # raises when replicas differ
    stats = transport.stats()
    state.close()
    return {"losses": losses, "checksums": checksums, "stats": stats}


def exit_paths(config: dict[str, Any]) -> dict[str, Any]:
    """A reduction that times out (rank 1 never takes part); threads and ports after each close."""
    before = {t.name for t in threading.enumerate()}
    out: dict[str, Any] = {}
    state, _ = dlcp.DLCP(bound=0.05, timeout_s=1.0, packet_bytes=256).ddp_hook()
    endpoints = [n.transport.endpoints for n in state.communicator.topology.nodes]
    try:
        if distributed.rank() == 0:
            try:
                state.all_reduce([torch.ones(1000)])
            except RuntimeError as error:  # torch futures wrap the TimeoutError of the transport
                out["error"] = str(error)
    finally:
        state.close()
    out["threads_after_timeout"] = sorted({t.name for t in threading.enumerate()} - before)
    out["ports_free"] = _ports_free(endpoints)
    distributed.barrier()
    # a state that is never closed explicitly is closed when the process leaves its group
    state, _ = dlcp.DLCP(bound=0.0, packet_bytes=256).ddp_hook()
    tensor = torch.full((300,), float(distributed.rank()))
    state.all_reduce([tensor])
    out["mean"] = tensor[:3].tolist()
    endpoints = [n.transport.endpoints for n in state.communicator.topology.nodes]
    distributed.barrier()
    distributed.destroy_group()  # the worker leaves its group (the runtime does so after each trial)
    out["threads_after_group_exit"] = sorted({t.name for t in threading.enumerate()} - before)
    out["ports_free_after_group_exit"] = _ports_free(endpoints)
    return out


def _ports_free(endpoints: list[list[tuple[str, int]]]) -> bool:
    import socket

    for node in endpoints:
        for host, port in node:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                try:
                    probe.bind((host, port))
                except OSError:
                    return False
    return True
