"""The one module that talks to ``torch.distributed``.

Every function degrades gracefully without a process group (rank 0, world size 1, collectives
are no-ops), so each algorithm built on it also runs in a single process. torch is imported
lazily: importing dtune never imports torch.

Example:
    >>> from dtune.runtime import distributed as dist
    >>> dist.rank(), dist.world_size()
    (0, 1)
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "GroupSpec",
    "all_reduce_mean",
    "barrier",
    "broadcast_int",
    "broadcast_tensors",
    "destroy_group",
    "free_port",
    "init_group",
    "is_distributed",
    "local_rank",
    "on_group_exit",
    "rank",
    "rendezvous_address",
    "world_size",
]

RENDEZVOUS_ENV = "DTUNE_RENDEZVOUS_ADDR"

_control_group: Any = None
_exit_callbacks: list[Callable[[], None]] = []


@dataclass(frozen=True, kw_only=True)
class GroupSpec:
    """How one member joins a worker group: its rank and where the group meets."""

    rank: int
    world_size: int
    addr: str
    port: int
    backend: str = "auto"  # NCCL when CUDA is present, gloo otherwise
    timeout_s: float = 300.0
    local_rank: int | None = None


def rendezvous_address() -> str:
    """Where worker groups meet: loopback unless ``DTUNE_RENDEZVOUS_ADDR`` says otherwise."""
    return os.environ.get(RENDEZVOUS_ENV, "127.0.0.1")


def free_port(addr: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the group's TCPStore binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((addr, 0))
        return int(sock.getsockname()[1])


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def is_distributed() -> bool:
    """Whether this process is in a process group (never imports torch to find out)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and bool(dist.is_available() and dist.is_initialized())


def rank() -> int:
    return int(_dist().get_rank()) if is_distributed() else 0


def world_size() -> int:
    return int(_dist().get_world_size()) if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", rank()))


def init_group(spec: GroupSpec) -> None:
    """Join the group described by ``spec`` (TCP rendezvous) and make it the default group.

    Also creates a small gloo group for dtune's own control messages, so that they never
    interleave with the user's collectives (which may run on NCCL).
    """
    global _control_group
    dist = _dist()
    backend = spec.backend
    if backend == "auto":
        import torch

        backend = "nccl" if torch.cuda.is_available() else "gloo"
    os.environ.update(
        RANK=str(spec.rank),
        WORLD_SIZE=str(spec.world_size),
        LOCAL_RANK=str(spec.rank if spec.local_rank is None else spec.local_rank),
        MASTER_ADDR=spec.addr,
        MASTER_PORT=str(spec.port),
    )
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{spec.addr}:{spec.port}",
        rank=spec.rank,
        world_size=spec.world_size,
        timeout=datetime.timedelta(seconds=spec.timeout_s),
    )
    _control_group = dist.new_group(backend="gloo") if backend != "gloo" else None


def on_group_exit(callback: Callable[[], None]) -> None:
    """Call ``callback`` when this process leaves its group (strategies stop their threads)."""
    _exit_callbacks.append(callback)


def destroy_group() -> None:
    """Leave the group so the process can join another one (warm workers are reused)."""
    global _control_group
    while _exit_callbacks:
        with contextlib.suppress(Exception):
            _exit_callbacks.pop()()
    if is_distributed():
        with contextlib.suppress(Exception):  # a peer that died already is not our problem here
            _dist().destroy_process_group()
    _control_group = None
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)


def broadcast_int(value: int, src: int = 0) -> int:
    """Rank ``src``'s ``value`` on every rank (dtune's control messages)."""
    if not is_distributed():
        return value
    import torch

    tensor = torch.tensor([value], dtype=torch.int64)
    _dist().broadcast(tensor, src=src, group=_control_group)
    return int(tensor.item())


def all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    """Average ``tensors`` in place across ranks, flattened into one buffer per dtype."""
    if not is_distributed() or not tensors:
        return
    import torch

    dist = _dist()
    size = world_size()
    by_dtype: dict[Any, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        if flat.is_floating_point():
            flat /= size
        else:
            flat //= size
        offset = 0
        for tensor in group:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


def broadcast_tensors(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (one flat message per dtype)."""
    if not is_distributed() or not tensors:
        return
    import torch

    by_dtype: dict[Any, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        _dist().broadcast(flat, src=src)
        offset = 0
        for tensor in group:
            tensor.data.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


def barrier() -> None:
    if is_distributed():
        _dist().barrier(group=_control_group)
