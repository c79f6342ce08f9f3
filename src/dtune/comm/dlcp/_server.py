"""A parameter-server shard of DLCP as a process of its own (incast: many workers, one server).

In DLCP's parameter-server mode (Wang et al., "Domain-specific Communication Optimization for
Distributed DNN Training") workers push gradient packets to server shards, which aggregate
them with bounded loss and return the aggregate. :func:`serve` runs one shard: it learns each
worker's address per path from a HELLO (and adopts the workers' session), aggregates the
packets it owns (``index % shards == shard``), answers requests to send again, and returns once
every worker said BYE or nothing arrived for ``idle_timeout_s``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dtune.comm.dlcp._aggregator import Aggregator
from dtune.comm.dlcp._config import DLCP
from dtune.comm.dlcp._node import Node
from dtune.comm.dlcp._packet import Kind, Packetizer
from dtune.comm.dlcp._topology import deadline_config, make_node

__all__ = ["serve"]


class _Greeter:
    """Answers HELLO (learning the worker's endpoint on that path) and counts BYE."""

    kinds: tuple[Kind, ...] = (Kind.HELLO, Kind.BYE)

    def __init__(self, node: Node) -> None:
        self.node = node
        self.byes: set[int] = set()
        self.last_contact = time.monotonic()

    def on_packets(
        self, kind: Kind, rows: np.ndarray, header: np.ndarray, sources: list[Any], path: int
    ) -> None:
        self.last_contact = time.monotonic()
        for h, source in zip(header, sources, strict=True):
            worker = int(h["sender"])
            if kind is Kind.BYE:
                self.byes.add(worker)
                continue
            if self.node.session == 0:
                self.node.session = int(h["session"])
            if int(h["session"]) != self.node.session:
                continue
            self.node.transport.set_peer_path(worker, path, source)
            ack = self.node.packetizer.message(
                Kind.HELLO_ACK,
                np.zeros(0, np.uint8),
                sender=self.node.node_id,
                round=path,
                session=self.node.session,
            )
            self.node.transport.send(worker, ack, np.zeros(1, np.uint8), path=path)

    def on_timer(self, now: float) -> float:
        return float("inf")

    def fail(self, error: BaseException) -> None:
        """Nothing waits on the greeter."""


def serve(
    config: DLCP,
    *,
    shard: int,
    workers: int,
    endpoints: Sequence[tuple[str, int]],
    idle_timeout_s: float = 300.0,
    on_ready: Callable[[list[tuple[str, int]]], None] | None = None,
) -> dict[str, float]:
    """Run parameter-server shard ``shard`` of ``config.server_addresses`` for ``workers`` workers.

    ``endpoints`` are this shard's (host, port) per path (port 0: any; ``on_ready`` hears the
    bound endpoints). Blocks until every worker said BYE or ``idle_timeout_s`` passed without a
    packet; returns the shard's counters.

    Example:
        >>> from dtune.comm.dlcp import DLCP, Mode, serve
        >>> config = DLCP(mode=Mode.PS, server_addresses=((("10.0.0.9", 7000),),))
        >>> # on the server host: serve(config, shard=0, workers=4, endpoints=[("10.0.0.9", 7000)])
    """
    shards = len(config.server_addresses) or config.servers
    if not 0 <= shard < shards:
        raise ValueError(f"The value of `shard` is {shard!r}, but must be in [0, {shards - 1}].")
    if len(endpoints) != config.paths:
        raise ValueError(
            f"`endpoints` needs one (host, port) per path ({config.paths}), got {len(endpoints)}."
        )
    packer = Packetizer(packet_bytes=config.packet_bytes)
    node = make_node(
        config,
        packer,
        workers + shard,
        [h for h, _ in endpoints],
        session=0,
        ports=[int(p) for _, p in endpoints],
    )
    aggregator = Aggregator(
        node,
        position=shard,
        owners=shards,
        workers=workers,
        bound=config.bound,
        deadline=deadline_config(config),
        timeout_s=config.timeout_s,
    )
    greeter = _Greeter(node)
    node.add_role(aggregator)
    node.add_role(greeter)
    try:
        node.start()
        if on_ready is not None:
            on_ready(node.transport.endpoints)
        seen, since = -1, time.monotonic()
        while node.alive and len(greeter.byes) < workers:
            now = time.monotonic()
            if node.transport.packets_received != seen:
                seen, since = node.transport.packets_received, now
            elif now - since > idle_timeout_s:
                break
            time.sleep(0.05)
    finally:
        node.close()
    if node.error is not None:
        raise RuntimeError(f"DLCP shard {shard} failed: {node.error!r}") from node.error
    stats = {f"dlcp_{k}": float(v) for k, v in aggregator.stats.items()}
    stats.update(
        dlcp_packets_received=float(node.transport.packets_received),
        dlcp_bytes_sent=float(node.transport.bytes_sent),
    )
    return stats
