"""Server ranks for ShadowSync: embedding tables updated asynchronously, and the EASGD centre.

As in ShadowSync (Zheng et al., arXiv 2003.03477), sparse embedding tables are not replicated
and never averaged: they live on embedding parameter servers shared by every trainer (model
parallelism), and the dense part alone is replicated and synced. Here the last ``servers``
ranks of a group are server processes. Row ``r`` of every table lives on table server
``r % S``; the EASGD centre lives on the last server, which holds no table rows when the
strategy asks for a dedicated sync server (as in the paper, where sync PSs and embedding PSs
are different machines).

- **Lookup**: before a sparse module's forward, the trainer pulls the rows of the ids in the
  batch (each id once) into its local copy of the table, which is only a cache of those rows.
- **Update**: before the optimizer step, the trainer pushes ``-lr * grad`` for the rows it
  touched and drops the gradient, so its optimizer never updates the table itself. The push is
  sent without waiting for the server (asynchronous SGD); the server adds pushes as they arrive,
  Hogwild-style, so two trainers' updates to one row may interleave but none is lost to a
  later write of a stale row.
- **EASGD centre**: one exchange (send the replica, receive the centre before the elastic step)
  is atomic under a lock on the server that holds it.

Every trainer talks to a server over private gloo groups, one per trainer thread (training
thread, shadow thread), and the server answers each (trainer, group) pair from its own thread.
A trainer's ``close`` says goodbye on each of its links; ``serve`` returns once every trainer
has. Without any server (one process), lookups read the local table and pushes apply locally.
"""

from __future__ import annotations

import enum
import functools
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dtune.runtime import distributed
from dtune.train._sync_algorithms import easgd_centre_update

__all__ = ["ServerLink", "SparseTables", "serve"]


class _Op(enum.IntEnum):
    BYE = 0
    LOOKUP = 1
    PUSH = 2
    EXCHANGE_CENTRE = 3
    GET_CENTRE = 4
    SET_CENTRE = 5
    GET_TABLE = 6
    SET_TABLE = 7


_ACK = torch.ones(1, dtype=torch.int64)


def _header(op: _Op, index: int = 0, count: int = 0) -> torch.Tensor:
    return torch.tensor([int(op), index, count], dtype=torch.int64)


class ServerLink:
    """One trainer thread's line to the servers (one private group per thread)."""

    def __init__(self, group: Any, tables_on: list[int], centre_on: int) -> None:
        self._group = group
        self.tables_on = tables_on
        self.centre_on = centre_on
        self.servers = sorted({*tables_on, centre_on})
        self._pending: list[tuple[Any, list[torch.Tensor]]] = []  # isends and what they send
        self._closed = False

    @property
    def group(self) -> Any:
        if self._closed:
            raise RuntimeError("This line to the servers is closed (the strategy was closed).")
        return self._group

    def _send(self, dst: int, op: _Op, index: int = 0, *payload: torch.Tensor) -> None:
        count = payload[0].shape[0] if payload else 0
        distributed.send(_header(op, index, count), dst, group=self.group)
        for tensor in payload:
            distributed.send(tensor.contiguous(), dst, group=self.group)

    def _recv(self, src: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        distributed.recv(out, src, group=self.group)
        return out

    def _owners(self, ids: torch.Tensor) -> list[torch.Tensor]:
        if len(self.tables_on) == 1:
            return [torch.ones_like(ids, dtype=torch.bool)]
        owner = ids % len(self.tables_on)
        return [owner == s for s in range(len(self.tables_on))]

    def lookup(self, index: int, ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of table ``index`` (``like`` gives row width and dtype)."""
        masks = self._owners(ids)
        for server, mask in zip(self.tables_on, masks, strict=True):  # all requests, then replies
            self._send(server, _Op.LOOKUP, index, ids[mask])
        rows = torch.empty((ids.shape[0], like.shape[1]), dtype=like.dtype)
        for server, mask in zip(self.tables_on, masks, strict=True):
            rows[mask] = self._recv(server, (int(mask.sum()), like.shape[1]), like.dtype)
        return rows

    def push(self, index: int, ids: torch.Tensor, update: torch.Tensor) -> None:
        """Add ``update`` to rows ``ids`` of table ``index`` on the servers; does not wait."""
        self._drain()
        for server, mask in zip(self.tables_on, self._owners(ids), strict=True):
            tensors = [
                _header(_Op.PUSH, index, int(mask.sum())),
                ids[mask].contiguous(),
                update[mask].contiguous(),
            ]
            for tensor in tensors:
                self._pending.append((distributed.isend(tensor, server, group=self.group), tensors))

    def _drain(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

    def exchange_centre(self, replica: torch.Tensor) -> torch.Tensor:
        """EASGD: send ``replica``; the server moves its centre; returns the centre before."""
        self._send(self.centre_on, _Op.EXCHANGE_CENTRE, 0, replica)
        return self._recv(self.centre_on, tuple(replica.shape), replica.dtype)

    def get_centre(self, like: torch.Tensor) -> torch.Tensor:
        distributed.send(_header(_Op.GET_CENTRE, 0, like.shape[0]), self.centre_on, group=self.group)
        return self._recv(self.centre_on, tuple(like.shape), like.dtype)

    def set_centre(self, centre: torch.Tensor) -> None:
        """Replace the centre; returns once the server holds it (so later exchanges see it)."""
        self._send(self.centre_on, _Op.SET_CENTRE, 0, centre)
        self._recv(self.centre_on, (1,), torch.int64)

    def get_table(self, index: int, like: torch.Tensor) -> torch.Tensor:
        table = torch.empty_like(like)
        rows = torch.arange(like.shape[0])
        for server, mask in zip(self.tables_on, self._owners(rows), strict=True):
            distributed.send(_header(_Op.GET_TABLE, index), server, group=self.group)
            table[mask] = self._recv(server, tuple(like.shape), like.dtype)[mask]
        return table

    def set_table(self, index: int, table: torch.Tensor) -> None:
        """Replace table ``index``; returns once every server holds its rows."""
        for server in self.tables_on:
            self._send(server, _Op.SET_TABLE, index, table)
        for server in self.tables_on:
            self._recv(server, (1,), torch.int64)

    def close(self) -> None:
        """Finish pending pushes and say goodbye to every server (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._drain()
            for server in self.servers:
                distributed.send(_header(_Op.BYE), server, group=self._group)
        finally:
            self._group = None  # destroyed next: its threads end with the last reference


class SparseTables:
    """Trainer side of the embedding servers for the sparse modules of one model.

    Example:
        >>> import torch
        >>> from dtune.train._servers import SparseTables
        >>> bag = torch.nn.EmbeddingBag(10, 4, mode="sum", sparse=True)
        >>> tables = SparseTables([("bag", bag)], link=None, lr=0.5)  # no server: apply locally
        >>> bag(torch.tensor([[1, 2]])).sum().backward()
        >>> before = bag.weight[1].clone()
        >>> tables.push(optimizer=None)
        >>> torch.allclose(bag.weight[1], before - 0.5), bag.weight.grad is None
        (True, True)
    """

    def __init__(
        self, modules: list[tuple[str, nn.Module]], *, link: ServerLink | None, lr: float | None
    ) -> None:
        self.modules = modules
        self.weights: list[torch.Tensor] = []
        for name, module in modules:
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                raise TypeError(f"Sparse module {name!r} must have a 2-D `weight` table (an embedding).")
            self.weights.append(weight)
        self.link = link
        self.lr = lr
        self._touched: list[list[torch.Tensor]] = [[] for _ in modules]
        self._hooks = []
        if link is not None:
            for index, (_, module) in enumerate(modules):
                hook = functools.partial(self._pull, link, index)
                self._hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _pull(
        self, link: ServerLink, index: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        ids = args[0] if args else kwargs["input"]
        unique = torch.unique(ids.reshape(-1))
        weight = self.weights[index].data
        weight.index_copy_(0, unique, link.lookup(index, unique, weight))
        if torch.is_grad_enabled():
            self._touched[index].append(unique)

    def _lr(self, param: torch.Tensor, optimizer: Any) -> float:
        if self.lr is not None:
            return self.lr
        for group in getattr(optimizer, "param_groups", []):
            if any(p is param for p in group["params"]):
                return float(group["lr"])
        raise ValueError(
            "A sparse table is in no optimizer param group and `sparse_lr` is None: give the optimizer "
            "the table or give the strategy `sparse_lr`."
        )

    def push(self, optimizer: Any) -> None:
        """Send every table's SGD update to its servers (or apply it locally) and drop the grads."""
        for index, weight in enumerate(self.weights):
            grad, touched = weight.grad, self._touched[index]
            self._touched[index] = []
            if grad is None:
                continue
            if grad.is_sparse:
                grad = grad.coalesce()
                ids, values = grad.indices()[0], grad.values()
            else:
                ids = (
                    torch.unique(torch.cat(touched)) if touched else torch.nonzero(grad.abs().sum(1)).view(-1)
                )
                values = grad[ids]
            update = values * -self._lr(weight, optimizer)
            if self.link is None:
                weight.data.index_add_(0, ids, update)
            else:
                self.link.push(index, ids, update)
            weight.grad = None  # the optimizer must not update the table a second time

    def tables(self) -> dict[str, torch.Tensor]:
        """The authoritative tables (from the servers), by module name."""
        out = {}
        for index, (name, _) in enumerate(self.modules):
            weight = self.weights[index].data
            out[name] = weight.clone() if self.link is None else self.link.get_table(index, weight)
        return out

    def load_tables(self, tables: dict[str, torch.Tensor]) -> None:
        for index, (name, _) in enumerate(self.modules):
            self.weights[index].data.copy_(tables[name])
            if self.link is not None:
                self.link.set_table(index, tables[name])

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def _answer(
    trainer: int,
    group: Any,
    tables: list[torch.Tensor],
    centre: dict[str, Any],
    served: Callable[[str], None],
) -> None:
    header = torch.empty(3, dtype=torch.int64)

    def payload(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        distributed.recv(out, trainer, group=group)
        return out

    while True:
        distributed.recv(header, trainer, group=group)
        op, index, count = (int(v) for v in header)
        if op == _Op.BYE:
            return
        if op in (_Op.LOOKUP, _Op.PUSH):
            table = tables[index]
            ids = payload((count,), torch.int64)
            if op == _Op.LOOKUP:
                distributed.send(table.index_select(0, ids), trainer, group=group)
            else:
                table.index_add_(0, ids, payload((count, table.shape[1]), table.dtype))
        elif op in (_Op.EXCHANGE_CENTRE, _Op.GET_CENTRE, _Op.SET_CENTRE):
            vector = centre["value"] if op == _Op.GET_CENTRE else payload((count,), centre["value"].dtype)
            with centre["lock"]:
                if op == _Op.EXCHANGE_CENTRE:
                    reply = easgd_centre_update(centre["value"], vector, centre["moving_rate"])
                elif op == _Op.GET_CENTRE:
                    reply = centre["value"].clone()
                else:
                    centre["value"].copy_(vector)
                    reply = _ACK
            distributed.send(reply, trainer, group=group)
        elif op == _Op.GET_TABLE:
            distributed.send(tables[index].contiguous(), trainer, group=group)
        elif op == _Op.SET_TABLE:
            tables[index].copy_(payload(tuple(tables[index].shape), tables[index].dtype))
            distributed.send(_ACK, trainer, group=group)
        else:
            raise RuntimeError(f"server: unknown request {op} from rank {trainer}")
        served(_Op(op).name.lower())


def serve(
    *,
    tables: list[torch.Tensor],
    centre: torch.Tensor | None,
    moving_rate: float,
    trainers: list[int],
    groups: list[Any],
) -> dict[str, int]:
    """Answer every trainer on every group until each has said goodbye; returns request counts.

    ``tables`` (updated in place) and ``centre`` are this server's state. A failure in any
    answering thread is raised here once the others have ended.
    """
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def served(name: str) -> None:
        with lock:
            counts[name] = counts.get(name, 0) + 1

    state = {
        "value": centre if centre is not None else torch.zeros(0),
        "lock": threading.Lock(),
        "moving_rate": moving_rate,
    }
    errors: list[BaseException] = []
    ended = threading.Semaphore(0)

    def run(trainer: int, group: Any) -> None:
        try:
            _answer(trainer, group, tables, state, served)
        except BaseException as exc:  # raised by serve() at once
            errors.append(exc)
        finally:
            ended.release()

    threads = [
        threading.Thread(target=run, args=(t, g), name=f"dtune-server-{t}", daemon=True)
        for g in groups
        for t in trainers
    ]
    for thread in threads:
        thread.start()
    for _ in threads:
        ended.acquire()
        if errors:
            # Fail the whole group now: the trainers wait for replies that will not come. The
            # other answering threads are blocked on their trainers and end with the groups.
            raise RuntimeError(f"An embedding/sync server thread failed: {errors[0]!r}") from errors[0]
    for thread in threads:
        thread.join()
    return counts
