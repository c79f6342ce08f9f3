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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "GroupSpec",
    "all_gather_flat",
    "all_gather_object",
    "all_reduce_mean",
    "all_reduce_sum_bucketed",
    "barrier",
    "broadcast_int",
    "broadcast_tensors",
    "broadcast_tensors_in",
    "destroy_group",
    "destroy_subgroup",
    "free_port",
    "init_group",
    "is_distributed",
    "local_rank",
    "new_group",
    "new_subgroups",
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


def new_group(ranks: Sequence[int]) -> Any:
    """A process group of ``ranks`` for collectives among a subset of the workers.

    Collective: every rank must call it with the same ``ranks``, in the same order, members or
    not (``torch.distributed.new_group`` requires it). Returns None, meaning the default group,
    when ``ranks`` is the whole group or there is no process group.
    """
    members = sorted(set(ranks))
    if not is_distributed() or members == list(range(world_size())):
        return None
    return _dist().new_group(ranks=members)


def all_reduce_sum_bucketed(
    tensors: list[torch.Tensor], *, bucket_mb: float = 25.0, group: Any = None
) -> None:
    """Sum ``tensors`` in place across the ranks of ``group``, in flat buckets of <= ``bucket_mb``.

    Tensors are packed in order into one flat buffer per bucket (same dtype); every bucket's
    all-reduce is started before the first is waited for, so the transfers overlap the packing
    and unpacking of the others. A tensor larger than a bucket gets a bucket of its own.
    """
    if not is_distributed() or not tensors:
        return
    import torch

    dist = _dist()
    limit = max(1, int(bucket_mb * 2**20))
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        last = buckets[-1] if buckets else None
        if last is None or size + nbytes > limit or last[0].dtype != tensor.dtype:
            buckets.append([tensor])
            size = nbytes
        else:
            last.append(tensor)
            size += nbytes
    pending = []
    for bucket in buckets:
        flat = torch.cat([t.reshape(-1) for t in bucket])
        pending.append((bucket, flat, dist.all_reduce(flat, group=group, async_op=True)))
    for bucket, flat, work in pending:
        work.wait()
        offset = 0
        for tensor in bucket:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


def broadcast_tensors_in(tensors: list[torch.Tensor], *, src: int, group: Any = None) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values, among the ranks of ``group``.

    Like :func:`broadcast_tensors` but within a subgroup (``src`` is a global rank and a member
    of ``group``; None is the default group), one flat message per dtype. Every member calls it
    with tensors of the same shapes.
    """
    if not is_distributed() or not tensors:
        return
    import torch

    by_dtype: dict[Any, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for same in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in same])
        _dist().broadcast(flat, src=src, group=group)
        if rank() == src:
            continue
        offset = 0
        for tensor in same:
            tensor.data.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


def new_subgroups(partition: list[list[int]]) -> Any:
    """Create one process group per list of ranks in ``partition``; return this rank's group.

    Every rank must call this with the same ``partition`` (a partition of all ranks), because
    creating a group is itself a collective over the default group. Without a process group
    there is nothing to create: returns None, which every helper here reads as "the default
    group", so single-process code needs no special case.
    """
    if not is_distributed():
        return None
    group, _ = _dist().new_subgroups_by_enumeration(partition)
    return group


def destroy_subgroup(group: Any) -> None:
    """Release a group made by :func:`new_subgroups` (never the default group; None is a no-op)."""
    if group is not None and is_distributed():
        with contextlib.suppress(Exception):  # already gone with the default group
            _dist().destroy_process_group(group)


def all_gather_flat(
    tensor: torch.Tensor, group: Any = None, async_op: bool = False
) -> tuple[torch.Tensor, Any]:
    """Gather a 1-D ``tensor`` of the same size from every member of ``group``, concatenated.

    Returns ``(output, work)``: ``output`` holds member ``i``'s tensor at
    ``output[i * n:(i + 1) * n]`` (members in group-rank order). With ``async_op=True``,
    ``work.wait()`` must return before ``output`` is read, and ``tensor`` must not be written
    meanwhile; otherwise ``work`` is None. Without a process group: ``(tensor.clone(), None)``.
    """
    if tensor.dim() != 1:
        raise ValueError(f"all_gather_flat gathers 1-D tensors, got shape {tuple(tensor.shape)}.")
    if not is_distributed():
        return tensor.clone(), None
    dist = _dist()
    size = int(dist.get_world_size(group))
    output = tensor.new_empty(size * tensor.numel())
    work = dist.all_gather(list(output.chunk(size)), tensor, group=group, async_op=async_op)
    return output, work if async_op else None


def all_gather_object(obj: Any, group: Any = None) -> list[Any]:
    """Every member's picklable ``obj``, in group-rank order; always fresh copies (also alone)."""
    if not is_distributed():
        import copy

        return [copy.deepcopy(obj)]
    dist = _dist()
    gathered: list[Any] = [None] * int(dist.get_world_size(group))
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def new_private_group(ranks: Sequence[int] | None = None, *, timeout_s: float | None = None) -> Any:
    """A fresh gloo group over ``ranks`` (default: every rank) for one thread's traffic alone.

    Unlike :func:`new_group`, this never hands back the default group, even for all ranks: a
    background thread (ShadowSync's shadow thread, a server loop) needs a group of its own so
    that its collectives and messages never interleave with the training thread's.
    ``timeout_s`` bounds each operation (default: the default group's timeout). Collective:
    every rank calls it in the same order, members or not. None without a process group.
    """
    if not is_distributed():
        return None
    members = sorted(set(range(world_size()) if ranks is None else ranks))
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    return _dist().new_group(ranks=members, timeout=timeout, backend="gloo")


def send(tensor: torch.Tensor, dst: int, *, group: Any = None) -> None:
    """Send ``tensor`` to global rank ``dst``; returns once it has been handed over."""
    _dist().send(tensor, dst=dst, group=group)


def isend(tensor: torch.Tensor, dst: int, *, group: Any = None) -> Any:
    """Start sending ``tensor`` to ``dst``; ``wait()`` the result before writing ``tensor``."""
    return _dist().isend(tensor, dst=dst, group=group)


def recv(tensor: torch.Tensor, src: int, *, group: Any = None, timeout_s: float | None = None) -> None:
    """Receive into ``tensor`` (its exact size) from global rank ``src``.

    ``timeout_s`` overrides the group's timeout for this one message (RuntimeError after it).
    """
    dist = _dist()
    if timeout_s is None:
        dist.recv(tensor, src=src, group=group)
        return
    pg = dist.group.WORLD if group is None else group
    work = pg.recv([tensor], dist.get_group_rank(pg, src), 0)
    work.wait(datetime.timedelta(seconds=timeout_s))


__all__ += ["isend", "new_private_group", "recv", "send"]


def local_address(peer: str | None = None) -> str:
    """This host's IPv4 address on the route to ``peer`` (default: the group's rendezvous address).

    A data plane of one's own (DLCP's UDP sockets) binds here, so that in a network namespace it
    uses the namespace's interface rather than loopback. No packet is sent: connecting a UDP
    socket only picks the route.
    """
    target = peer or os.environ.get("MASTER_ADDR") or rendezvous_address()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((target, 9))
        return str(sock.getsockname()[0])


__all__ += ["local_address"]
