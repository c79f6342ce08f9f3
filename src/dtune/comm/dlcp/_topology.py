"""Who talks to whom: the data-plane nodes of one rank, their addresses and the handshake.

DLCP (Wang et al., "Domain-specific Communication Optimization for Distributed DNN Training")
works with collective routines and with a parameter server. torch.distributed stays the
control plane: the ranks exchange their data-plane endpoints with one ``all_gather_object``
and agree on a random session number. In collective mode each rank's node is a worker and
an aggregator of its share; in direct mode a worker and the aggregator of everything, for
itself; in PS mode a rank's node is a worker, and the shards run either on
ranks 0..S-1 (nodes of their own) or in separate processes (:func:`~dtune.comm.dlcp.serve`),
which learn the workers' addresses from a HELLO handshake.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field

import numpy as np

from dtune.comm.dlcp._aggregator import Aggregator, DeadlineConfig
from dtune.comm.dlcp._config import DLCP, Mode
from dtune.comm.dlcp._node import Node
from dtune.comm.dlcp._packet import Kind, Packetizer
from dtune.comm.dlcp._transport import Transport
from dtune.comm.dlcp._worker import Worker
from dtune.runtime import distributed

__all__ = ["Topology", "deadline_config"]


def deadline_config(config: DLCP) -> DeadlineConfig:
    return DeadlineConfig(
        initial_s=config.initial_deadline_s,
        factor=config.deadline_factor,
        floor_s=config.min_deadline_s,
        ceil_s=config.max_deadline_s,
    )


def make_node(
    config: DLCP,
    packer: Packetizer,
    node_id: int,
    addresses: list[str],
    session: int,
    ports: list[int] | None = None,
) -> Node:
    transport = Transport(
        addresses,
        row_bytes=packer.row_bytes,
        dscp=config.dscp,
        loss=config.loss,
        node_id=node_id,
        ports=ports,
        send_buffer_bytes=config.send_buffer_kb << 10,
    )
    rate = None if config.rate_mbit is None else config.rate_mbit * 1e6 / 8
    return Node(node_id, transport, packer, session=session, rate_bytes_s=rate, copies=config.copies)


@dataclass
class Topology:
    """This rank's nodes: ``node`` (the worker) and any parameter-server shards it hosts."""

    rank: int
    world: int
    node: Node
    worker: Worker
    shards: list[Node] = field(default_factory=list)
    external: bool = False

    @classmethod
    def build(cls, config: DLCP, packer: Packetizer) -> Topology:
        """Make, connect and start this rank's nodes (collective over the process group)."""
        rank, world = distributed.rank(), distributed.world_size()
        session = distributed.broadcast_int(int.from_bytes(os.urandom(4), "little") or 1)
        addresses = (
            list(config.addresses[rank]) if config.addresses else [distributed.local_address()] * config.paths
        )
        deadline = deadline_config(config)
        node = make_node(config, packer, rank, addresses, session)
        made: list[Node] = [node]
        try:
            if config.mode is not Mode.PS:
                direct = config.mode is Mode.DIRECT  # every rank owns everything, for itself
                local = Aggregator(
                    node,
                    position=0 if direct else rank,
                    owners=1 if direct else world,
                    workers=world,
                    bound=config.bound,
                    deadline=deadline,
                    timeout_s=config.timeout_s,
                    direct=direct,
                )
                worker = Worker(
                    node,
                    owners=[rank] if direct else list(range(world)),
                    local=local,
                    pull_bound=0.0,
                    deadline=deadline,
                    timeout_s=config.timeout_s,
                    peers=[r for r in range(world) if r != rank] if direct else None,
                )
                local.local = worker.on_local
                node.add_role(local)
                node.add_role(worker)
                everyone = distributed.all_gather_object(node.transport.endpoints)
                for peer, endpoints in enumerate(everyone):
                    node.transport.set_peer(peer, endpoints)
                node.start()
                return cls(rank, world, node, worker)
            external = bool(config.server_addresses)
            count = len(config.server_addresses) if external else min(config.servers, world)
            owners = [world + s for s in range(count)]
            worker = Worker(
                node,
                owners=owners,
                local=None,
                pull_bound=config.pull_bound,
                deadline=deadline,
                timeout_s=config.timeout_s,
            )
            node.add_role(worker)
            shards: list[Node] = []
            if not external and rank < count:
                shard = make_node(config, packer, world + rank, addresses, session)
                made.append(shard)
                shard.add_role(
                    Aggregator(
                        shard,
                        position=rank,
                        owners=count,
                        workers=world,
                        bound=config.bound,
                        deadline=deadline,
                        timeout_s=config.timeout_s,
                    )
                )
                shards.append(shard)
            mine = {
                "worker": node.transport.endpoints,
                "shard": shards[0].transport.endpoints if shards else None,
            }
            everyone = distributed.all_gather_object(mine)
            for s, owner in enumerate(owners):
                endpoints = config.server_addresses[s] if external else everyone[s]["shard"]
                node.transport.set_peer(owner, endpoints)
            for shard in shards:
                for peer, entry in enumerate(everyone):
                    shard.transport.set_peer(peer, entry["worker"])
                shard.start()
            node.start()
            topology = cls(rank, world, node, worker, shards, external)
            if external:
                topology.hello(owners, config.timeout_s)
            return topology
        except BaseException:
            for made_node in made:
                made_node.close()
            raise

    def hello(self, owners: list[int], timeout_s: float) -> None:
        """Announce this worker to external shards on every path until each acknowledges."""
        paths = len(self.node.transport.sockets)
        wanted = {(owner, path) for owner in owners for path in range(paths)}
        deadline = time.monotonic() + timeout_s
        while not wanted <= self.worker.acks:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"DLCP: parameter-server shards {sorted(owners)} did not answer within {timeout_s} s."
                )
            for owner, path in wanted - self.worker.acks:
                self.node.call(functools.partial(self._hello, owner, path))
            time.sleep(0.05)

    def _hello(self, owner: int, path: int) -> None:
        row = self.node.packetizer.message(
            Kind.HELLO,
            np.zeros(0, np.uint8),
            sender=self.rank,
            round=path,
            step=self.world,
            session=self.node.session,
        )
        self.node.transport.send(owner, row, np.zeros(1, np.uint8), path=path)

    @property
    def nodes(self) -> list[Node]:
        return [self.node, *self.shards]

    def close(self, linger_s: float) -> None:
        """Say goodbye, keep answering requests until every peer did too, then stop and close all.

        A rank whose last reduction is complete may still hold packets a peer has asked for, or
        is about to ask for: so every rank sends BYE to the others and to external shards, and
        serves requests until each other rank's BYE arrived (or ``linger_s`` passed).
        """
        peers = [r for r in range(self.world) if r != self.rank]
        targets = peers + (list(self.worker.owners) if self.external else [])
        deadline = time.monotonic() + linger_s
        try:
            while self.node.alive:
                for target in targets:
                    self.node.call(
                        functools.partial(self.node.message, target, Kind.BYE, np.zeros(0, np.uint8))
                    )
                if set(peers) <= self.worker.byes or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            time.sleep(0.02)  # the last BYEs leave
        except RuntimeError:  # the node stopped meanwhile
            pass
        for node in self.nodes:
            node.close()
