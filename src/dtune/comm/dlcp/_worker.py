"""The worker role: push a contribution in priority order, answer requests, assemble the result.

In DLCP (Wang et al., "Domain-specific Communication Optimization for Distributed DNN
Training") the sender sends a step's packets most important first, so that what a deadline
cuts off is the least important tail. A worker sends each owner the packets it owns, keeps
them until the result is in (to resend what an owner asks for: retransmissions go first and
are marked protected), and assembles the owners' aggregated packets; an owner whose END came
with packets still missing (or that went quiet for long) is asked again. The result carries
each packet's contributor bitmap, from which the caller derives error feedback and the
realised loss.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dtune.comm.dlcp._aggregator import Aggregator, DeadlineConfig, Key, forget_older, send_nacks
from dtune.comm.dlcp._deadline import AdaptiveDeadline
from dtune.comm.dlcp._node import Node
from dtune.comm.dlcp._packet import FIELDS, HEADER_BYTES, Flag, Kind, Packetizer, dtype_code, torch_dtype
from dtune.comm.dlcp._reduction import Assembly

__all__ = ["Job", "Result", "Worker"]

_TAIL = 4  # packets marked as the end of a sender's stream (one of them arriving is enough)


@dataclass(slots=True)
class Result:
    """A finished reduction: ``values`` (packets, per packet), contributor ``mask`` per packet,
    ``have`` (False where a bounded pull gave up on a packet)."""

    values: torch.Tensor
    mask: np.ndarray
    have: np.ndarray


@dataclass(eq=False)
class Job:
    """One reduction this worker takes part in: its packed DATA rows and the future to complete."""

    key: Key
    rows: np.ndarray
    classes: np.ndarray
    dtype: torch.dtype
    future: torch.futures.Future[Result] = field(default_factory=torch.futures.Future)
    assembly: Assembly | None = None
    started: float = 0.0
    next_nack: float = 0.0
    first_result: float | None = None
    ended: dict[int, float] = field(default_factory=dict)  # owner -> when its END arrived


class Worker:
    """Sends ``Job`` rows to ``owners`` (node ids, by position) and assembles the results.

    ``local`` is this node's own aggregator in collective and direct modes (its share is added
    locally and its result comes back without the network); ``peers`` (direct mode) are the
    nodes that reduce every packet themselves: each gets all of this worker's packets, kept for
    ``history`` steps after the result is in, since a peer may still ask for some of them;
    ``pull_bound`` lets a parameter-server pull complete with that fraction of aggregated
    packets missing.
    """

    kinds: tuple[Kind, ...] = (Kind.AGG, Kind.NACK, Kind.HELLO_ACK, Kind.END, Kind.BYE)

    def __init__(
        self,
        node: Node,
        *,
        owners: list[int],
        local: Aggregator | None,
        pull_bound: float,
        deadline: DeadlineConfig,
        timeout_s: float,
        peers: list[int] | None = None,
        history: int = 8,
    ) -> None:
        self.node = node
        self.owners = owners
        self.peers = list(peers or [])
        self.history = history
        self.sent: collections.OrderedDict[Key, Job] = collections.OrderedDict()
        self.local = local
        self.pull_bound = pull_bound
        self.deadline = deadline
        self.timeout_s = timeout_s
        self.jobs: dict[Key, Job] = {}
        self.bursts: dict[tuple[int, int], AdaptiveDeadline] = {}
        self.acks: set[tuple[int, int]] = set()
        self.byes: set[int] = set()
        self.stats = collections.Counter[str]()

    # -- on the loop thread -------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        now = time.monotonic()
        packer: Packetizer = self.node.packetizer
        total = len(job.rows)
        per = packer.per_packet(job.dtype)
        job.assembly = Assembly(total=total, per=per, dtype=job.dtype, bound=self.pull_bound, now=now)
        job.started = now
        job.next_nack = now + self._retry(job.key)
        self.jobs[job.key] = job
        values = packer.values(job.rows, job.dtype)
        count = len(self.owners)
        targets = [(o, np.arange(p, total, count, dtype=np.int64)) for p, o in enumerate(self.owners)]
        targets += [(peer, np.arange(total, dtype=np.int64)) for peer in self.peers]
        for owner, index in targets:
            if not index.size:
                continue
            if owner == self.node.node_id and self.local is not None:
                protected = int((job.classes[index] == 0).sum())
                self.local.set_total(job.key, total, job.dtype)
                self.local.contribute(
                    job.key, owner, index, values[torch.from_numpy(index)], job.classes[index], protected
                )
            else:
                order = index[np.argsort(job.classes[index], kind="stable")]  # most important first
                rows = job.rows[order]  # a copy: the retained rows keep their flags
                rows[-_TAIL:, FIELDS["flags"][1]] |= int(Flag.TAIL)
                self.node.send(owner, rows, job.classes[order])
                last = int(job.classes[order[-1]])
                self.node.end(owner, job.key, Kind.DATA, total, int(dtype_code(job.dtype)), last)

    def on_local(
        self, key: Key, owned: np.ndarray, values: torch.Tensor, mask: np.ndarray, classes: np.ndarray
    ) -> None:
        """This node's own aggregator finished its share (collective mode)."""
        self._add(key, self.node.node_id, owned, values, mask, classes)

    def on_packets(
        self, kind: Kind, rows: np.ndarray, header: np.ndarray, sources: list[Any], path: int
    ) -> None:
        if kind is Kind.BYE:  # another rank is closing (see Topology.close)
            self.byes.update(int(h["sender"]) for h in header)
            return
        if kind is Kind.HELLO_ACK:
            for h in header:
                self.acks.add((int(h["sender"]), int(h["round"])))
            return
        if kind is Kind.END:  # an owner sent all of its aggregated packets: ask soon for what is missing
            now = time.monotonic()
            for h in header[header["cls"] == int(Kind.AGG)]:
                job = self.jobs.get((int(h["step"]), int(h["bucket"]), int(h["round"])))
                if job is not None:
                    job.ended[int(h["sender"])] = now
                    job.next_nack = min(job.next_nack, now + self.deadline.floor_s)
            return
        if kind is Kind.NACK:
            for i in np.flatnonzero(header["cls"] == int(Kind.DATA)):
                h = header[i]
                indices = (
                    rows[i, HEADER_BYTES : HEADER_BYTES + int(h["length"])].view(np.uint32).astype(np.int64)
                )
                self._resend(
                    (int(h["step"]), int(h["bucket"]), int(h["round"])),
                    int(h["sender"]),
                    indices,
                    bool(int(h["flags"]) & Flag.PROTECTED_ONLY),
                )
            return
        keys = np.stack([header["step"], header["bucket"], header["round"], header["sender"]], axis=1)
        for group in np.unique(keys, axis=0):
            select = np.flatnonzero((keys == group).all(axis=1))
            key = (int(group[0]), int(group[1]), int(group[2]))
            job = self.jobs.get(key)
            if job is None:  # a duplicate of something finished, or of another run
                self.stats["late_packets"] += len(select)
                continue
            dtype = torch_dtype(int(header["dtype"][select[0]]))
            values = self.node.packetizer.values(rows[select], dtype)
            sub = header[select]
            self._add(key, int(group[3]), sub["index"].astype(np.int64), values, sub["mask"], sub["cls"])

    def _resend(self, key: Key, owner: int, indices: np.ndarray, protected_only: bool) -> None:
        job = self.jobs.get(key) or self.sent.get(key)
        if job is None:
            return
        indices = indices[indices < len(job.rows)]
        if protected_only:
            indices = indices[job.classes[indices] == 0]
        if not indices.size:
            return
        rows = job.rows[indices]
        rows[:, FIELDS["flags"][1]] |= int(Flag.RETX)
        self.stats["retransmitted"] += len(indices)
        # asked for again: sent first, and marked protected so a congested switch keeps it
        self.node.send(owner, rows, np.zeros(len(indices), np.uint8), urgent=True)

    def _add(
        self,
        key: Key,
        owner: int,
        index: np.ndarray,
        values: torch.Tensor,
        mask: np.ndarray,
        classes: np.ndarray,
    ) -> None:
        job = self.jobs.get(key)
        if job is None or job.assembly is None:
            return
        now = time.monotonic()
        if job.first_result is None:
            job.first_result = now
        job.assembly.add(owner, index, values, mask, classes, now)
        if job.assembly.complete:
            self._finish(job, now)

    def _retry(self, key: Key) -> float:
        # how long an owner may pause inside its burst of aggregated packets before the rest
        # counts as lost; never below the initial deadline, so a descheduled thread is no loss
        burst = self.bursts.setdefault(key[1:], self.deadline.make()).seconds()
        return max(burst, self.deadline.initial_s)

    def _finish(self, job: Job, now: float) -> None:
        del self.jobs[job.key]
        asm = job.assembly
        assert asm is not None  # set in submit
        if job.first_result is not None:
            self.bursts.setdefault(job.key[1:], self.deadline.make()).record(now - job.first_result)
        self.stats["complete" if asm.complete else "pull_bounded"] += 1
        if self.peers:  # a peer may not have all of this job's packets yet
            job.assembly = None
            self.sent[job.key] = job
            forget_older(self.sent, job.key[0], self.history)
        job.future.set_result(Result(asm.values, asm.mask, asm.have))

    def on_timer(self, now: float) -> float:
        wake = float("inf")
        for job in list(self.jobs.values()):
            asm = job.assembly
            if asm is None:
                continue
            if now - job.started > self.timeout_s:
                del self.jobs[job.key]
                self.stats["timeouts"] += 1
                error = TimeoutError(
                    f"DLCP: step {job.key[0]} bucket {job.key[1]} round {job.key[2]} incomplete after "
                    f"{self.timeout_s} s ({int(asm.have.sum())} of {asm.total} packets)."
                )
                job.future.set_exception(error)  # type: ignore[arg-type]
                continue
            retry = self._retry(job.key)
            quiet = now - max(asm.last_arrival.values(), default=job.started)
            if asm.bound > 0 and quiet >= retry and asm.complete_enough():
                self._finish(job, now)
                continue
            if now >= job.next_nack:
                self._ask_again(job, asm, now, retry)
                job.next_nack = now + retry
            wake = min(wake, job.next_nack, job.started + self.timeout_s)
        return wake

    def _ask_again(self, job: Job, asm: Assembly, now: float, retry: float) -> None:
        missing = asm.missing()
        count = len(self.owners)
        for position, owner in enumerate(self.owners):
            if owner == self.node.node_id and self.local is not None:
                continue
            theirs = missing[missing % count == position]
            last = asm.last_arrival.get(owner)
            ended = job.ended.get(owner)
            # an owner whose END came lost the rest (or it is behind more important packets); one
            # that went quiet for long, its END too; one that sent nothing may still be reducing
            # (waiting for a slow sender): asked after the longest deadline (all may be lost)
            due = (
                (ended is not None and now - ended >= self.deadline.floor_s)
                # its END was lost too: under a full FIFO queue the tail of a burst and its END are
                # dropped together; quiet for twice a whole burst's usual length is loss enough
                or (last is not None and now - last >= retry)
                or now - job.started >= self.deadline.ceil_s
            )
            if theirs.size and due:
                self.stats["agg_nacks_sent"] += send_nacks(
                    self.node, owner, job.key, theirs, of=Kind.AGG, flags=Flag.NONE
                )

    def fail(self, error: BaseException) -> None:
        self.sent.clear()
        jobs, self.jobs = self.jobs, {}
        for job in jobs.values():
            if not job.future.done():
                job.future.set_exception(error)  # type: ignore[arg-type]  # torch's stub is too narrow
