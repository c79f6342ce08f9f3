"""DLCP as a dtune communicator: the all-reduce of any compressor, over bounded-loss packets.

DLCP (Wang et al., "Domain-specific Communication Optimization for Distributed DNN Training")
replaces the all-or-nothing collective with a transport that may complete without a bounded
fraction of packets. This class has the shape of :class:`dtune.comm.Communicator`
(``all_reduce``, ``all_gather``, ``rank``, ``world_size``, ``accounting``), so every
compressor's exchange runs over it unchanged: uncompressed (``Cast`` to fp32), fp16,
PowerSGD's two rounds. Per all-reduce it packs the payload (vectorised), classes each packet,
hands the packets to the worker node and, when the result is in, writes it back, keeps what
was dropped as error feedback and logs the realised loss per class.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

import numpy as np
import torch

from dtune.comm._base import BucketState
from dtune.comm._communicator import Communicator
from dtune.comm._stats import Accounting
from dtune.comm.dlcp._config import DLCP
from dtune.comm.dlcp._packet import Kind, Packetizer, wire_lengths
from dtune.comm.dlcp._priority import layer_positions
from dtune.comm.dlcp._topology import Topology
from dtune.comm.dlcp._worker import Job, Result
from dtune.runtime import distributed

__all__ = ["DLCPCommunicator", "LayerMap"]

logger = logging.getLogger(__name__)

LayerMap = tuple[np.ndarray, np.ndarray, int]  # (tensor end offsets, tensor layer ids, layers in model)


def _done(value: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(value)
    return fut


class DLCPCommunicator:
    """All-reduce over DLCP packets; all-gather over gloo (see :class:`DLCP` for the settings).

    ``stable_coordinates`` says that all-reduce payloads are the bucket's gradient coordinates
    (no compressor, or a cast), which error feedback and the layer rule need.
    """

    def __init__(self, config: DLCP, accounting: Accounting, *, stable_coordinates: bool) -> None:
        self.config = config
        self.accounting = accounting
        self.stable = stable_coordinates
        self.packer = Packetizer(packet_bytes=config.packet_bytes)
        self.gloo = Communicator(None, accounting)
        self.layers: dict[int, LayerMap] = {}
        self.residuals: dict[tuple[int, int], torch.Tensor] = {}
        self.ages: dict[tuple[int, int], np.ndarray] = {}
        self._rounds: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()
        classes = config.priority.classes
        self.sent_per_class = np.zeros(classes, dtype=np.int64)
        self.lost_per_class = np.zeros(classes, dtype=np.int64)
        self.log: collections.deque[dict[str, Any]] = collections.deque(maxlen=10_000)
        self.masks: dict[tuple[int, int], np.ndarray] = {}  # contributor bitmaps of the newest reduction
        self.pack_cpu_s = 0.0
        self.bounded_steps = 0
        self.topology: Topology | None = None
        if distributed.world_size() > 1:
            self.topology = Topology.build(config, self.packer)

    @property
    def rank(self) -> int:
        return distributed.rank()

    @property
    def world_size(self) -> int:
        return distributed.world_size()

    # -- the Communicator contract -------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor, bucket: BucketState) -> torch.futures.Future[torch.Tensor]:
        """Sum ``tensor`` over ranks in place (per packet: the mean over contributors times W)."""
        if self.topology is None:
            self.accounting.add(
                bucket=bucket.index, sent=tensor.numel() * tensor.element_size(), collectives=1
            )
            return _done(tensor)
        start = time.thread_time()
        round_ = self._next_round(bucket)
        key = (bucket.step, bucket.index, round_)
        memory = (bucket.index, round_)
        stable = self.stable and tensor.numel() == bucket.numel
        flat = tensor.view(-1)
        feedback = self.config.error_feedback and stable
        residual = self.residuals.pop(memory, None) if feedback else None
        if residual is not None and residual.shape == flat.shape:
            flat.add_(residual)
        rows = self.packer.pack(
            flat,
            kind=Kind.DATA,
            sender=self.rank,
            session=self.topology.node.session,
            step=key[0],
            bucket=key[1],
            round=key[2],
        )
        header = self.packer.headers(rows)
        values = self.packer.values(rows, flat.dtype)
        layer_map = self.layers.get(bucket.index) if stable else None
        if layer_map is not None:
            ids, position = layer_positions(*layer_map, header["offset"].astype(np.int64))
        else:
            ids, position = np.zeros(len(rows), np.int64), np.full(len(rows), 0.5)
        age = self.ages.get(memory) if feedback else None
        if age is not None and len(age) != len(rows):
            age = None
        classes = self.config.priority.classify(values, header["length"], position, age)
        owners = len(self.topology.worker.owners)
        owner_of = np.arange(len(rows)) % owners
        protected = np.bincount(owner_of[classes == 0], minlength=owners)
        self.packer.set_field(rows, "cls", classes)
        self.packer.set_field(rows, "layer", np.minimum(ids, 65535).astype(np.uint16))
        self.packer.set_field(rows, "protected", protected[owner_of].astype(np.uint32))
        job = Job(key, rows, classes, flat.dtype)
        worker = self.topology.worker
        if worker.peers:  # direct exchange: every row to every other rank
            on_wire = int(wire_lengths(rows).sum()) * len(worker.peers)
        else:  # to each owner its share; the local share stays here
            remote = (owner_of != self.rank) if worker.local else slice(None)
            on_wire = int(wire_lengths(rows[remote]).sum())
        on_wire *= self.config.copies
        self.accounting.add(bucket=bucket.index, sent=on_wire, collectives=1)
        with self._lock:
            self.pack_cpu_s += time.thread_time() - start
        self.topology.node.call(lambda: self.topology.worker.submit(job) if self.topology else None)
        return job.future.then(lambda fut: self._finish(fut.value(), flat, job, memory, feedback))

    def all_gather(
        self, tensor: torch.Tensor, bucket: BucketState, *, variable: bool = False
    ) -> torch.futures.Future[list[torch.Tensor]]:
        """Every rank's ``tensor``, reliably, over gloo (sparse payloads must not lose packets)."""
        return self.gloo.all_gather(tensor, bucket, variable=variable)

    # -- results ------------------------------------------------------------------------------

    def _next_round(self, bucket: BucketState) -> int:
        with self._lock:
            slot = (bucket.step, bucket.index)
            round_ = self._rounds.get(slot, 0)
            self._rounds = {k: v for k, v in self._rounds.items() if k[0] >= bucket.step - 1}
            self._rounds[slot] = round_ + 1
            return round_

    def _finish(
        self, result: Result, flat: torch.Tensor, job: Job, memory: tuple[int, int], feedback: bool
    ) -> torch.Tensor:
        start = time.thread_time()
        contribution = self.packer.values(job.rows, flat.dtype).reshape(-1)[: flat.numel()].clone()
        flat.copy_(result.values.reshape(-1)[: flat.numel()])
        included = ((result.mask >> np.uint64(self.rank)) & np.uint64(1)).astype(bool) | ~result.have
        dropped = ~included
        self.masks[memory] = result.mask
        if feedback:
            if dropped.any():
                per = self.packer.per_packet(flat.dtype)
                keep = torch.from_numpy(np.repeat(dropped, per)[: flat.numel()])
                # the packet was averaged over the other senders, which already stood in for
                # this one with the share result / W: only the difference is still owed
                owed = contribution.sub_(flat, alpha=1.0 / self.world_size)
                self.residuals[memory] = owed.mul_(keep)
                age = self.ages.get(memory)
                previous = (
                    age if age is not None and len(age) == len(dropped) else np.zeros(len(dropped), np.int64)
                )
                self.ages[memory] = np.where(dropped, previous + 1, 0)
            else:
                self.ages.pop(memory, None)
        sent = np.bincount(job.classes, minlength=len(self.sent_per_class))
        lost = np.bincount(job.classes[dropped], minlength=len(self.lost_per_class))
        if dropped.any():
            logger.debug(
                "DLCP step %d bucket %d round %d: realised loss per class %s",
                *job.key,
                np.round(lost / np.maximum(sent, 1), 4).tolist(),
            )
        with self._lock:
            self.sent_per_class += sent
            self.lost_per_class += lost
            self.bounded_steps += int(dropped.any())
            self.log.append(
                {
                    "step": job.key[0],
                    "bucket": job.key[1],
                    "round": job.key[2],
                    "loss": (lost / np.maximum(sent, 1)).tolist(),
                    "lost": float(dropped.mean()),
                    "packets": len(dropped),
                }
            )
            self.pack_cpu_s += time.thread_time() - start
        return flat

    # -- statistics and shutdown --------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {"dlcp_pack_cpu_s": self.pack_cpu_s}
        with self._lock:
            total_sent = int(self.sent_per_class.sum())
            out["dlcp_loss"] = float(self.lost_per_class.sum() / max(total_sent, 1))
            for c, (s, lost) in enumerate(zip(self.sent_per_class, self.lost_per_class, strict=True)):
                out[f"dlcp_loss_class{c}"] = float(lost / s) if s else 0.0
            out["dlcp_reductions_with_loss"] = float(self.bounded_steps)
        if self.topology is None:
            return out
        counters: collections.Counter[str] = collections.Counter()
        for node in self.topology.nodes:
            t = node.transport
            counters.update(
                packets_sent=t.packets_sent,
                bytes_sent=t.bytes_sent,
                packets_received=t.packets_received,
                injected_drops=t.injected_drops,
                stale_packets=node.stale_packets,
            )
            for kind_roles in {id(r): r for rs in node.roles.values() for r in rs}.values():
                counters.update(getattr(kind_roles, "stats", {}))
        out.update({f"dlcp_{k}": float(v) for k, v in sorted(counters.items())})
        return out

    def close(self) -> None:
        if self.topology is not None:
            self.topology.close(self.config.linger_s)
