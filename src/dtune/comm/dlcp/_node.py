"""One endpoint of the DLCP data plane: an event-loop thread over a node's UDP sockets.

DLCP (Wang et al., "Domain-specific Communication Optimization for Distributed DNN Training")
keeps torch.distributed for the control plane and moves gradients over its own packets. A
:class:`Node` owns one :class:`~dtune.comm.dlcp.Transport` and one thread that does all the
work of the data plane: it receives and dispatches packets, sends queued packets (in priority
order, retransmissions first, optionally paced), and fires timers (deadlines, requests to send
again, time-outs). Other threads only submit commands (:meth:`Node.call`), so the state needs
no locks. Roles attach to a node: a worker pushes its contributions and assembles results, an
aggregator (a collective-mode rank or a parameter-server shard) reduces what it owns.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from dtune.comm.dlcp._packet import Kind, Packetizer
from dtune.comm.dlcp._transport import Transport

__all__ = ["Node", "Role"]

logger = logging.getLogger(__name__)

_TICK_S = 0.05  # the longest the loop sleeps, so close() is seen quickly
_SEND_BUDGET = 256  # packets per loop turn before looking at the sockets again


class Role(Protocol):
    """What a node dispatches to: packets of some kinds, and timers."""

    kinds: tuple[Kind, ...]

    def on_packets(
        self, kind: Kind, rows: np.ndarray, header: np.ndarray, sources: list[Any], path: int
    ) -> None: ...

    def on_timer(self, now: float) -> float:
        """Do what is due; return when to be called next (``inf``: nothing pending)."""
        ...

    def fail(self, error: BaseException) -> None:
        """The loop stopped (close or crash): fail whatever callers wait on."""
        ...


class Node:
    """A data-plane endpoint: ``node_id``'s sockets, send queues and the loop thread.

    Example:
        >>> from dtune.comm.dlcp import Node, Packetizer, Transport
        >>> packer = Packetizer(packet_bytes=64)
        >>> node = Node(0, Transport(["127.0.0.1"], row_bytes=packer.row_bytes), packer, session=7)
        >>> node.start(); node.close()
    """

    def __init__(
        self,
        node_id: int,
        transport: Transport,
        packetizer: Packetizer,
        *,
        session: int,
        rate_bytes_s: float | None = None,
        copies: int = 1,
        name: str = "dtune-dlcp",
    ) -> None:
        self.node_id = node_id
        self.transport = transport
        self.packetizer = packetizer
        self.session = session
        self.roles: dict[Kind, list[Role]] = {}
        self._all_roles: list[Role] = []
        self._urgent: collections.deque[tuple[int, np.ndarray, np.ndarray]] = collections.deque()
        self._queue: collections.deque[tuple[int, np.ndarray, np.ndarray]] = collections.deque()
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._blocked = False
        self._rate = rate_bytes_s
        self.copies = copies
        self._tokens = float(packetizer.row_bytes * 16)
        self._last_refill = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{name}-{node_id}", daemon=True)
        self.error: BaseException | None = None
        self.stale_packets = 0

    def add_role(self, role: Role) -> None:
        for kind in role.kinds:
            self.roles.setdefault(kind, []).append(role)
        self._all_roles.append(role)

    # -- called from any thread ---------------------------------------------------------------

    def start(self) -> None:
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        for sock in self.transport.sockets:
            self._selector.register(sock, selectors.EVENT_READ)
        self._thread.start()

    def call(self, command: Callable[[], None]) -> None:
        """Run ``command`` on the loop thread, soon."""
        if self._stop.is_set():
            raise RuntimeError("The DLCP node is closed.")
        self._commands.put(command)
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the loop thread and close every socket (idempotent)."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self._release()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- used by roles, on the loop thread ----------------------------------------------------

    def send(self, node: int, rows: np.ndarray, classes: np.ndarray, *, urgent: bool = False) -> None:
        """Queue ``rows`` for ``node`` (after loss injection); urgent ones go before all others.

        With ``copies`` > 1 the rows go that many times, the copies after all the originals: a
        receiver keeps the first of each, so a packet is lost only if every copy is.
        """
        if self.copies > 1:
            rows, classes = np.concatenate([rows] * self.copies), np.concatenate([classes] * self.copies)
        keep = self.transport.keep(rows)
        if not keep.all():
            rows, classes = rows[keep], classes[keep]
        if len(rows):
            (self._urgent if urgent else self._queue).append((node, rows, classes))

    def message(
        self,
        node: int,
        kind: Kind,
        payload: np.ndarray,
        *,
        urgent: bool = True,
        dscp_class: int = 0,
        **fields: Any,
    ) -> None:
        """Send one small control row (NACK, END, HELLO...), marked as class ``dscp_class``.

        ``urgent`` ones go before everything queued; others (END) after what is queued already.
        """
        row = self.packetizer.message(kind, payload, sender=self.node_id, session=self.session, **fields)
        self.send(node, row, np.full(1, dscp_class, dtype=np.uint8), urgent=urgent)

    def end(
        self, node: int, key: tuple[int, int, int], of: Kind, total: int, dtype: int, dscp_class: int
    ) -> None:
        """Queue the END of this node's packets of reduction ``key`` to ``node``.

        It is marked like the last packet before it, so a priority switch does not let it overtake
        them: it arrives once the sender's packets have arrived or were dropped.
        """
        step, bucket, round_ = key
        fields = {
            "step": step,
            "bucket": bucket,
            "round": round_,
            "cls": int(of),
            "total": total,
            "dtype": dtype,
        }
        self.message(node, Kind.END, np.zeros(0, np.uint8), urgent=False, dscp_class=dscp_class, **fields)

    # -- the loop -----------------------------------------------------------------------------

    def _run(self) -> None:
        wake_at = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= wake_at:
                    wake_at = min((role.on_timer(now) for role in self._all_roles), default=float("inf"))
                pending = bool(self._urgent or self._queue) and not self._blocked
                timeout = 0.0 if pending and self._refill(now) else max(0.0, min(wake_at - now, _TICK_S))
                if (
                    pending
                    and self._rate is not None
                    and timeout == 0.0
                    and self._tokens < self.packetizer.row_bytes
                ):
                    timeout = min(_TICK_S, (self.packetizer.row_bytes - self._tokens) / self._rate)
                for key, events in self._selector.select(timeout):
                    if key.fileobj is self._wake_r:
                        self._drain_commands()
                        wake_at = 0.0
                        continue
                    if events & selectors.EVENT_WRITE:
                        self._set_blocked(False)
                    if events & selectors.EVENT_READ:
                        self._receive(key.fileobj)  # type: ignore[arg-type]
                        wake_at = 0.0
                if self._urgent or self._queue:
                    self._send_some(time.monotonic())
        except BaseException as error:  # surfaced to every waiting caller
            logger.exception("DLCP node %d stopped", self.node_id)
            self.error = error
        finally:
            self._stop.set()
            failure = self.error or RuntimeError("The DLCP node was closed.")
            for role in self._all_roles:
                with contextlib.suppress(Exception):
                    role.fail(failure)
            self._release()

    def _drain_commands(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while self._wake_r.recv(4096):
                pass
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _receive(self, sock: socket.socket) -> None:
        rows, sources = self.transport.receive(sock)
        if not len(rows):
            return
        header = self.packetizer.headers(rows)
        # HELLO opens a session: a parameter-server shard adopts the session of its workers
        ours = (header["session"] == self.session) | (header["kind"] == int(Kind.HELLO))
        if not ours.all():
            self.stale_packets += int((~ours).sum())
            rows, header = rows[ours], header[ours]
            sources = [s for s, keep in zip(sources, ours, strict=True) if keep]
        path = self.transport.path_of(sock)
        for kind_value in np.unique(header["kind"]):
            roles = self.roles.get(Kind(int(kind_value)), []) if kind_value in Kind._value2member_map_ else []
            select = np.flatnonzero(header["kind"] == kind_value)
            if not roles:
                self.stale_packets += len(select)
            for role in roles:
                role.on_packets(
                    Kind(int(kind_value)), rows[select], header[select], [sources[i] for i in select], path
                )

    def _refill(self, now: float) -> bool:
        """Top up the pacing tokens; whether at least one packet may go now."""
        if self._rate is None:
            return True
        burst = self.packetizer.row_bytes * 16
        self._tokens = min(burst, self._tokens + (now - self._last_refill) * self._rate)
        self._last_refill = now
        return self._tokens >= self.packetizer.row_bytes

    def _send_some(self, now: float) -> None:
        if self._blocked or not self._refill(now):
            return
        budget = _SEND_BUDGET
        if self._rate is not None:
            budget = min(budget, int(self._tokens // self.packetizer.row_bytes))
        while budget > 0 and (self._urgent or self._queue):
            line = self._urgent if self._urgent else self._queue
            node, rows, classes = line[0]
            if node not in self.transport.peers:  # not reachable (yet): a peer that never said hello
                line.popleft()
                continue
            count = min(budget, len(rows))
            before = self.transport.bytes_sent
            sent = self.transport.send(node, rows[:count], classes[:count])
            budget -= sent
            if self._rate is not None:  # the bytes that went (short packets cost less)
                self._tokens -= self.transport.bytes_sent - before
            if sent == len(rows):
                line.popleft()
            else:
                line[0] = (node, rows[sent:], classes[sent:])
            if sent < count:
                self._set_blocked(True)
                return

    def _set_blocked(self, blocked: bool) -> None:
        if blocked == self._blocked:
            return
        self._blocked = blocked
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if blocked else 0)
        for sock in self.transport.sockets:
            self._selector.modify(sock, events)

    def _release(self) -> None:
        with contextlib.suppress(Exception):
            self._selector.close()
        self.transport.close()
        for sock in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()
