"""The data plane: non-blocking UDP sockets, one per path, with DSCP marks and packet spraying.

DLCP (Wang et al., "Domain-specific Communication Optimization for Distributed DNN Training")
runs over UDP because a reliable, ordered byte stream is exactly what bounded loss must avoid:
TCP would hold every later byte behind a lost one. Each node binds one UDP socket per path
(its address on that path); packets go round-robin over the paths (spraying: each packet is
self-describing, so no reordering buffer is needed). With ``dscp`` each packet carries its
class as a DSCP code point (an ``IP_TOS`` control message per datagram), so an emulated switch
can queue and drop by class. :class:`LossInjection` is the test hook: a deterministic, seeded
drop of outgoing packets inside the transport, never the network.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dtune.comm.dlcp._packet import FIELDS, HEADER_BYTES, Flag, Kind, wire_lengths
from dtune.comm.dlcp._priority import DSCP_OF_CLASS

__all__ = ["LossInjection", "Transport"]

_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
_KIND = FIELDS["kind"][1]
_CLS = FIELDS["cls"][1]
_FLAGS = FIELDS["flags"][1]


@dataclass(frozen=True, kw_only=True)
class LossInjection:
    """Drop outgoing packets on purpose (tests): each one of ``kinds`` whose class is in
    ``classes`` (all when None) is dropped with probability ``rate``, from a generator seeded
    with ``seed`` and the node id; ``first_only`` spares retransmissions.

    Example:
        >>> from dtune.comm.dlcp import DLCP, LossInjection
        >>> config = DLCP(bound=0.05, loss=LossInjection(rate=0.02, seed=1))
    """

    rate: float = 0.0
    classes: frozenset[int] | None = None
    kinds: frozenset[Kind] = frozenset({Kind.DATA})
    first_only: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.rate, bool) or not isinstance(self.rate, int | float):
            raise TypeError(f"`rate` must be a number, got {type(self.rate).__name__}.")
        if not 0 <= self.rate <= 1:
            raise ValueError(f"The value of `rate` is {self.rate!r}, but must be in [0, 1].")
        if self.classes is not None and not isinstance(self.classes, frozenset):
            raise TypeError(f"`classes` must be a frozenset or None, got {type(self.classes).__name__}.")


def _raise_buffer(sock: socket.socket, force: int, plain: int, size: int) -> None:
    try:  # root (as in network namespaces) may exceed net.core.rmem_max
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, plain, size)


class Transport:
    """One node's sockets: ``addresses[p]`` is its address on path ``p`` (port chosen by the OS).

    Example:
        >>> import numpy as np
        >>> from dtune.comm.dlcp import Transport
        >>> with Transport(["127.0.0.1"], row_bytes=64) as a, Transport(["127.0.0.1"], row_bytes=64) as b:
        ...     a.set_peer(1, b.endpoints)
        ...     a.send(1, np.zeros((2, 64), np.uint8), np.zeros(2, np.uint8))
        2
    """

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        row_bytes: int,
        dscp: bool = False,
        loss: LossInjection | None = None,
        node_id: int = 0,
        ports: Sequence[int] | None = None,
        buffer_bytes: int = 32 << 20,
        send_buffer_bytes: int = 128 << 10,
        batch: int = 512,
    ) -> None:
        self.row_bytes = row_bytes
        self.dscp = dscp
        self.loss = loss
        self._rng = np.random.default_rng([loss.seed, node_id]) if loss is not None else None
        self.sockets: list[socket.socket] = []
        self.peers: dict[int, list[tuple[str, int]]] = {}
        self._next_path = 0
        self._tos = [[(socket.IPPROTO_IP, socket.IP_TOS, bytes([d << 2]))] for d in DSCP_OF_CLASS]
        self.recv_buffer = np.zeros((batch, row_bytes), dtype=np.uint8)
        self._views = [memoryview(row) for row in self.recv_buffer]  # type: ignore[arg-type]
        self.packets_sent = self.bytes_sent = self.packets_received = self.injected_drops = 0
        self.malformed = 0
        try:
            for path, address in enumerate(addresses):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self.sockets.append(sock)
                sock.bind((address, 0 if ports is None else int(ports[path])))
                sock.setblocking(False)
                _raise_buffer(sock, _SO_RCVBUFFORCE, socket.SO_RCVBUF, buffer_bytes)
                # a small send buffer: a full local queue (a shaped link) then blocks the sender
                # instead of dropping its datagrams silently, as UDP does when the qdisc is full
                _raise_buffer(sock, _SO_SNDBUFFORCE, socket.SO_SNDBUF, send_buffer_bytes)
        except BaseException:
            self.close()
            raise

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [sock.getsockname()[:2] for sock in self.sockets]

    def set_peer(self, node: int, endpoints: Sequence[tuple[str, int]]) -> None:
        if len(endpoints) != len(self.sockets):
            raise ValueError(f"Node {node} has {len(endpoints)} paths, this node {len(self.sockets)}.")
        self.peers[node] = [(str(h), int(p)) for h, p in endpoints]

    def set_peer_path(self, node: int, path: int, endpoint: tuple[str, int]) -> None:
        """Learn one path's endpoint of ``node`` (a parameter server learns workers from HELLO)."""
        known = self.peers.setdefault(node, [endpoint] * len(self.sockets))
        known[path] = (str(endpoint[0]), int(endpoint[1]))

    def keep(self, rows: np.ndarray) -> np.ndarray:
        """Which of ``rows`` survive loss injection (all without it); call once per row, in order."""
        if self.loss is None or self._rng is None or not len(rows):
            return np.ones(len(rows), dtype=bool)
        draw = self._rng.random(len(rows))
        drop = draw < self.loss.rate
        kinds = np.isin(rows[:, _KIND], [int(k) for k in self.loss.kinds])
        drop &= kinds
        if self.loss.classes is not None:
            drop &= np.isin(rows[:, _CLS], sorted(self.loss.classes))
        if self.loss.first_only:
            drop &= (rows[:, _FLAGS] & int(Flag.RETX)) == 0
        self.injected_drops += int(drop.sum())
        return ~drop

    def send(self, node: int, rows: np.ndarray, classes: np.ndarray, *, path: int | None = None) -> int:
        """Send ``rows`` to ``node`` until the socket would block; returns how many went.

        Packets are sprayed round-robin over the paths unless ``path`` pins one. One Python call
        per packet (Python has no ``sendmmsg``); each datagram is the row without its padding.
        """
        endpoints = self.peers[node]
        paths = len(self.sockets)
        lengths = wire_lengths(rows).tolist()
        sent = nbytes = 0
        for i in range(len(rows)):
            p = self._next_path if path is None else path
            sock = self.sockets[p]
            datagram = rows[i][: lengths[i]]
            try:
                if self.dscp:
                    sock.sendmsg([datagram], self._tos[int(classes[i])], 0, endpoints[p])
                else:
                    sock.sendto(datagram, endpoints[p])
            except BlockingIOError:
                break
            except OSError as error:  # e.g. ENOBUFS from a full qdisc: the packet is lost, as on a wire
                if error.errno not in (errno.ENOBUFS, errno.EAGAIN):
                    raise
            sent += 1
            nbytes += lengths[i]
            if path is None:
                self._next_path = (p + 1) % paths
        self.packets_sent += sent
        self.bytes_sent += nbytes
        return sent

    def receive(self, sock: socket.socket) -> tuple[np.ndarray, list[tuple[str, int]]]:
        """Drain up to one batch of datagrams from ``sock``: (rows, source addresses).

        The rows are a view of a buffer reused by the next call.
        """
        count = 0
        sources: list[tuple[str, int]] = []
        views = self._views
        while count < len(views):
            try:
                size, source = sock.recvfrom_into(views[count])
            except (BlockingIOError, InterruptedError):
                break
            if size < HEADER_BYTES:
                self.malformed += 1
                continue
            if size < self.row_bytes:  # sent without its padding: read as the padded row
                self.recv_buffer[count, size:] = 0
            sources.append(source)
            count += 1
        self.packets_received += count
        return self.recv_buffer[:count], sources

    def path_of(self, sock: socket.socket) -> int:
        return self.sockets.index(sock)

    def close(self) -> None:
        while self.sockets:
            with contextlib.suppress(OSError):
                self.sockets.pop().close()

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
