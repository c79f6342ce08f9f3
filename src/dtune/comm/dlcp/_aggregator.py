"""The aggregator role: reduce the packets a node owns, with bounded loss, and send the result.

In DLCP (Wang et al., "Domain-specific Communication Optimization for Distributed DNN
Training") a reduction is split over owners packet by packet (``owner = index % owners``): in
collective mode every rank owns a share (a reduce-scatter), in parameter-server mode every
server shard does (per-packet load balancing). An owner sums what arrives into a
:class:`~dtune.comm.dlcp.Reduction`, completes it by the bounded-loss rule at an adaptive
deadline, asks senders again for what is missing otherwise, and sends the averaged packets
with their contributor bitmaps to every worker (kept for a few steps to answer requests).

When to stop waiting: each sender ends its packets with an END marker (marked like its last
packet, so a priority switch does not let it overtake them). Once every sender's END (or one
of its last packets) arrived, a short adaptive grace covers packets still in flight; what is
missing then was lost, or sits behind more important traffic, which is what the bound lets a
reduction give up. While a sender is still sending, only a pause as long as the adaptive
deadline cuts its stream, so a slow sender (a busy CPU or link) is waited for.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dtune.comm.dlcp._deadline import AdaptiveDeadline
from dtune.comm.dlcp._node import Node
from dtune.comm.dlcp._packet import FIELDS, HEADER_BYTES, Flag, Kind, Packetizer, torch_dtype
from dtune.comm.dlcp._reduction import Outcome, Reduction

__all__ = ["Aggregator", "DeadlineConfig", "Key", "forget_older"]

Key = tuple[int, int, int]  # (step, bucket, round)


def forget_older(kept: collections.OrderedDict[Key, Any], newest_step: int, history: int) -> None:
    """Drop entries of ``kept`` (oldest first) from more than ``history`` steps before ``newest_step``."""
    while kept and next(iter(kept))[0] + history < newest_step:
        kept.popitem(last=False)


@dataclass(frozen=True, kw_only=True)
class DeadlineConfig:
    initial_s: float
    factor: float
    floor_s: float
    ceil_s: float

    def make(self) -> AdaptiveDeadline:
        return AdaptiveDeadline(
            initial_s=self.initial_s, factor=self.factor, floor_s=self.floor_s, ceil_s=self.ceil_s
        )


def send_nacks(node: Node, target: int, key: Key, indices: np.ndarray, *, of: Kind, flags: Flag) -> int:
    """Ask ``target`` to send packets ``indices`` of ``key`` again; returns how many NACKs went."""
    per = node.packetizer.packet_bytes // 4
    step, bucket, round_ = key
    count = 0
    for start in range(0, max(len(indices), 1), per):
        chunk = indices[start : start + per].astype(np.uint32)
        node.message(
            target, Kind.NACK, chunk, step=step, bucket=bucket, round=round_, cls=int(of), flags=int(flags)
        )
        count += 1
    return count


class Aggregator:
    """Reduces the share ``position`` of ``owners`` of every reduction, for ``workers`` senders.

    ``local`` (collective and direct modes) receives this node's own result without the
    network. ``direct``: this node reduces every packet for itself alone (direct exchange): it
    sums in sender order (:class:`Reduction`'s ``ordered``) so every rank's sum is the same bits,
    and sends its result to nobody.
    """

    kinds: tuple[Kind, ...] = (Kind.DATA, Kind.NACK, Kind.END)

    def __init__(
        self,
        node: Node,
        *,
        position: int,
        owners: int,
        workers: int,
        bound: float,
        deadline: DeadlineConfig,
        timeout_s: float,
        history: int = 8,
        local: Callable[[Key, np.ndarray, torch.Tensor, np.ndarray, np.ndarray], None] | None = None,
        direct: bool = False,
    ) -> None:
        self.node = node
        self.direct = direct
        self.position = position
        self.owners = owners
        self.workers = workers
        self.bound = bound
        self.deadline = deadline
        self.timeout_s = timeout_s
        self.history = history
        self.local = local
        self.reductions: dict[Key, Reduction] = {}
        self.dtypes: dict[Key, torch.dtype] = {}
        self.next_check: dict[Key, float] = {}
        self.nack_at: dict[Key, float] = {}
        self.results: collections.OrderedDict[Key, tuple[np.ndarray, float]] = collections.OrderedDict()
        self.deadlines: dict[tuple[int, int], AdaptiveDeadline] = {}
        self.graces: dict[tuple[int, int], AdaptiveDeadline] = {}
        self.newest_step = 0
        self.stats = collections.Counter[str]()

    # -- incoming -----------------------------------------------------------------------------

    def reduction(self, key: Key, *, total: int, dtype: torch.dtype, now: float) -> Reduction | None:
        """The reduction of ``key`` (made on first contact); None when it is finished or too old."""
        found = self.reductions.get(key)
        if found is not None:
            return found
        if key in self.results or key[0] + self.history < self.newest_step:
            return None
        per = self.node.packetizer.per_packet(dtype)
        owned = np.arange(self.position, total, self.owners, dtype=np.int64)
        made = Reduction(
            total=total,
            per=per,
            owned=owned,
            senders=list(range(self.workers)),
            bound=self.bound,
            now=now,
            ordered=self.direct,
        )
        self.reductions[key] = made
        self.dtypes[key] = dtype
        self.next_check[key] = now + self.deadline.ceil_s
        self.newest_step = max(self.newest_step, key[0])
        return made

    def contribute(
        self,
        key: Key,
        sender: int,
        index: np.ndarray,
        values: torch.Tensor,
        classes: np.ndarray,
        protected: int,
    ) -> None:
        """This node's own packets (collective mode), added without the network."""
        now = time.monotonic()
        red = self.reduction(key, total=int(index.max(initial=-1)) + 1, dtype=values.dtype, now=now)
        if red is not None:
            red.add(sender, index, values, classes, protected, now, tail=True)
            self._check(key, now)

    def set_total(self, key: Key, total: int, dtype: torch.dtype) -> Reduction | None:
        return self.reduction(key, total=total, dtype=dtype, now=time.monotonic())

    def on_packets(
        self, kind: Kind, rows: np.ndarray, header: np.ndarray, sources: list[Any], path: int
    ) -> None:
        if kind is Kind.NACK:  # a worker missed some of our aggregated packets
            for i in np.flatnonzero(header["cls"] == int(Kind.AGG)):
                h = header[i]
                indices = rows[i, HEADER_BYTES : HEADER_BYTES + int(h["length"])].view(np.uint32)
                self.answer((int(h["step"]), int(h["bucket"]), int(h["round"])), int(h["sender"]), indices)
            return
        now = time.monotonic()
        if kind is Kind.END:  # a sender is done with a reduction (cls DATA: ours to reduce)
            for h in header[header["cls"] == int(Kind.DATA)]:
                key = (int(h["step"]), int(h["bucket"]), int(h["round"]))
                red = self.reduction(key, total=int(h["total"]), dtype=torch_dtype(int(h["dtype"])), now=now)
                if red is not None:
                    red.finish(int(h["sender"]), now)
                    self._check(key, now)
            return
        keys = np.stack([header["step"], header["bucket"], header["round"], header["sender"]], axis=1)
        for group in np.unique(keys, axis=0):
            step, bucket, round_, sender = (int(v) for v in group)
            select = np.flatnonzero((keys == group).all(axis=1))
            first = header[select[0]]
            key = (step, bucket, round_)
            dtype = torch_dtype(int(first["dtype"]))
            red = self.reduction(key, total=int(first["total"]), dtype=dtype, now=now)
            if red is None:
                self.stats["late_packets"] += len(select)
                continue
            values = self.node.packetizer.values(rows[select], dtype)
            tail = bool((header["flags"][select] & int(Flag.TAIL)).any())
            index = header["index"][select].astype(np.int64)
            red.add(sender, index, values, header["cls"][select], int(first["protected"]), now, tail)
            self._check(key, now)

    # -- timers and completion ----------------------------------------------------------------

    def _deadline_of(self, key: Key) -> AdaptiveDeadline:
        return self.deadlines.setdefault(key[1:], self.deadline.make())

    def _grace_of(self, key: Key) -> AdaptiveDeadline:
        grace = self.deadline.floor_s
        made = AdaptiveDeadline(
            initial_s=grace, factor=self.deadline.factor, floor_s=grace, ceil_s=self.deadline.ceil_s
        )
        return self.graces.setdefault(key[1:], made)

    def _due(self, key: Key, red: Reduction) -> float:
        """When the reduction may stop waiting for the packets still missing.

        Once every sender's tail arrived, a short grace (how late stragglers of full reductions
        came after the tails, recently) covers packets still in flight; what is missing then was
        lost. While a sender is still sending, the stream is only cut after the adaptive deadline
        *and* a pause of the same length, so a sender slowed down (a busy CPU, a busy link) is
        waited for and only a stalled tail is given up.
        """
        finished = red.all_finished_at()
        if finished is not None:
            return finished + self._grace_of(key).seconds()
        started = red.all_started_at()
        if started is None:  # a sender unheard of: all its packets may have been lost
            return red.started_at + self.deadline.ceil_s
        deadline_s = self._deadline_of(key).seconds()
        return max(started, red.last_arrival) + deadline_s

    def _check(self, key: Key, now: float) -> None:
        red = self.reductions[key]
        due = self._due(key, red)
        outcome = red.decide(deadline_passed=now >= due)
        if outcome is Outcome.WAIT:
            self.next_check[key] = due
            return
        if outcome is not Outcome.NACK:
            self._finish(key, red, outcome, now)
            return
        if now >= self.nack_at.get(key, 0.0):
            self.stats["nack_rounds"] += 1
            for sender in red.senders:
                if sender == self.node.node_id:
                    continue
                absent, protected_only = red.missing(sender)
                if absent.size:
                    flags = Flag.PROTECTED_ONLY if protected_only else Flag.NONE
                    self.stats["data_nacks_sent"] += send_nacks(
                        self.node, sender, key, absent, of=Kind.DATA, flags=flags
                    )
            # ask again after a deadline if the answers do not come (a retransmission lost too)
            self.nack_at[key] = now + self._deadline_of(key).seconds()
        self.next_check[key] = self.nack_at[key]

    def _forget(self, key: Key) -> None:
        self.reductions.pop(key, None)
        self.dtypes.pop(key, None)
        self.next_check.pop(key, None)
        self.nack_at.pop(key, None)

    def _finish(self, key: Key, red: Reduction, outcome: Outcome, now: float) -> None:
        started, finished = red.all_started_at(), red.all_finished_at()
        if started is not None and red.ready_at is not None:
            self._deadline_of(key).record(red.ready_at - started)
        if outcome is Outcome.FULL and finished is not None:
            self._grace_of(key).record(red.last_arrival - finished)
        self.stats["full" if outcome is Outcome.FULL else "bounded"] += 1
        dtype = self.dtypes[key]
        self._forget(key)
        values, mask = red.result(dtype)
        owned_classes = np.where(red.classes == 255, 1, red.classes).astype(np.uint8)
        if self.direct:  # nothing sent, so no rows to answer requests with
            rows = np.zeros((0, self.node.packetizer.row_bytes), np.uint8)
        else:
            rows = self._share(key, red, values, mask, owned_classes)
        # kept a while: to answer requests, and so that late duplicates start nothing new
        self.results[key] = (rows, time.monotonic())
        forget_older(self.results, self.newest_step, self.history)
        if self.local is not None:
            self.local(key, red.owned, values, mask, owned_classes)

    def _share(
        self, key: Key, red: Reduction, values: torch.Tensor, mask: np.ndarray, owned_classes: np.ndarray
    ) -> np.ndarray:
        """Send the aggregated packets to every other worker; returns them, to answer requests."""
        packer: Packetizer = self.node.packetizer
        fields = {"step": key[0], "bucket": key[1], "round": key[2], "session": self.node.session}
        rows = packer.pack(values.reshape(-1), kind=Kind.AGG, sender=self.node.node_id, **fields)
        packer.set_field(rows, "index", red.owned.astype(np.uint32))
        packer.set_field(rows, "offset", (red.owned * red.per).astype(np.uint32))
        packer.set_field(rows, "total", np.full(len(rows), red.total, dtype=np.uint32))
        packer.set_field(rows, "mask", mask)
        packer.set_field(rows, "cls", owned_classes)
        order = np.argsort(owned_classes, kind="stable")  # protected first
        # aggregated packets carry every sender's values: more important than any one push
        # (DLCP's tighter pull bound), so a switch never ranks them below class 1
        rows, classes = rows[order], np.minimum(owned_classes[order], 1)
        for worker in range(self.workers):
            if worker == self.node.node_id and self.local is not None:
                continue
            self.node.send(worker, rows, classes)
            self.node.end(
                worker, key, Kind.AGG, red.total, int(rows[0, FIELDS["dtype"][1]]), int(classes[-1])
            )
        return rows

    def on_timer(self, now: float) -> float:
        for key in list(self.reductions):
            red = self.reductions[key]
            if now - red.started_at > self.timeout_s:  # a sender vanished: give up on this one
                self.stats["expired"] += 1
                self._forget(key)
            elif now >= self.next_check[key]:
                self._check(key, now)
        return min(self.next_check.values(), default=float("inf"))

    def answer(self, key: Key, requester: int, indices: np.ndarray) -> None:
        """Send aggregated packets of ``key`` again (a worker missed them)."""
        found = self.results.get(key)
        if found is None:
            return
        rows, sent_at = found
        if time.monotonic() - sent_at < self.deadline.floor_s:
            return  # just sent: the request crossed the packets on their way
        wanted = np.isin(self.node.packetizer.headers(rows)["index"], indices)
        self.stats["agg_resent"] += int(wanted.sum())
        self.node.send(requester, rows[wanted], np.zeros(int(wanted.sum()), np.uint8), urgent=True)

    def fail(self, error: BaseException) -> None:
        self.reductions.clear()
