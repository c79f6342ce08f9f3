"""The configuration of DLCP, dtune's bounded-loss, priority-packet gradient transport.

Wang et al., "Domain-specific Communication Optimization for Distributed DNN Training"
(arXiv 2008.08445; MLT, NSDI 2024): SGD tolerates a bounded loss of gradient values, so a step
need not wait for its last late packets; packets differ in importance by layer and magnitude;
and packets carrying (tensor, offset) can be sprayed over paths without reordering. The
end-host half is implemented faithfully here; the switch half (priority queues that drop the
least important packets first) is emulated with ``dtune.netem``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dtune.comm._base import Compressor
from dtune.comm.dlcp._priority import PriorityPolicy
from dtune.comm.dlcp._transport import LossInjection

if TYPE_CHECKING:
    from dtune.comm.dlcp._state import DLCPState

__all__ = ["DLCP", "Mode"]

MAX_WORKERS = 64  # one bit per sender in a packet's contributor bitmap


class Mode(enum.Enum):
    """Where gradients are reduced."""

    COLLECTIVE = "collective"
    """Reduce-scatter with bounded loss among the ranks, then a reliable all-gather."""
    PS = "ps"
    """Push to parameter-server shards (bounded loss), pull the aggregate (reliable, or ``pull_bound``)."""
    DIRECT = "direct"
    """Every rank sends its packets to every other rank and sums all of them itself, in rank order.

    One trip through the network per reduction where the collective mode takes two (a
    reduce-scatter, then an all-gather), for ``world - 1`` times the bytes: for small,
    latency-bound payloads (a compressor's). Reliable only (``bound=0``): ranks missing
    different packets would hold different sums, and nothing would bring them back together."""


def _number(name: str, value: Any, low: float, high: float, *, open_high: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}.")
    if not (low <= value < high if open_high else low <= value <= high):
        interval = f"[{low}, {high})" if open_high else f"[{low}, {high}]"
        raise ValueError(f"The value of `{name}` is {value!r}, but must be in {interval}.")


def _integer(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an integer, got {type(value).__name__}.")
    if value < low:
        raise ValueError(f"The value of `{name}` is {value!r}, but must be >= {low}.")


@dataclass(frozen=True, kw_only=True)
class DLCP:
    """Bounded-loss gradient averaging over dtune's own UDP packets; a DDP communication hook.

    - ``bound``: the fraction of (sender, packet) pairs a reduction may complete without, once
      its adaptive deadline (``deadline_factor`` x the median recent completion time, within
      ``[min_deadline_s, max_deadline_s]``) has passed; 0 is reliable.
    - ``mode``: :class:`Mode`. In DIRECT mode each rank reduces everything itself (one trip,
      reliable, for small payloads). In PS mode ``servers`` shards run on ranks 0..S-1, or on the
      processes at ``server_addresses`` (one ``((host, port), ...)`` per shard, a pair per path,
      started with :func:`~dtune.comm.dlcp.serve`); ``pull_bound`` (at most ``bound``) lets the
      pull complete without some aggregated packets (replicas may then differ).
    - ``packet_bytes`` of payload per packet (plus a 48-byte header); ``priority`` classes
      packets (:class:`PriorityPolicy`); ``paths`` sockets per node, sprayed round-robin, at
      ``addresses[rank]`` (one address per path; default: the address that reaches the
      rendezvous); ``dscp`` marks each packet's class for an emulated switch; ``rate_mbit``
      paces each node's sending; ``send_buffer_kb`` is each socket's send buffer (small, so a
      full queue at a shaped local link blocks the sender instead of dropping its datagrams).
    - ``copies``: every packet (and END, NACK) goes this many times, the copies after the
      originals. Redundancy for small, latency-bound payloads (a compressor's): a lost packet
      then costs nothing, where it costs a request and a resend (two more trips through the
      queues) with one copy; it multiplies the bytes, so leave it at 1 for large payloads.
    - ``error_feedback``: what was dropped is added to the next step's contribution, and a
      packet dropped again is promoted one class per drop, so no coordinate starves.
    - ``compressor``: a ``dtune.comm`` compressor whose all-reduce payloads travel as DLCP
      packets (all-gather payloads, as top-k's, are gathered reliably by gloo); error feedback
      on dropped packets needs payload coordinates that are the gradient's (None or ``Cast``).
    - ``timeout_s``: a reduction still incomplete after this fails; ``linger_s``: how long
      ``close`` keeps answering a peer's requests, waiting for every rank to close too.
    - ``loss``: a test hook dropping outgoing packets on purpose (:class:`LossInjection`).

    Example:
        >>> from dtune import train
        >>> from dtune.comm.dlcp import DLCP
        >>> strategy = train.AllReduce(compression=DLCP(bound=0.05))
    """

    bound: float = 0.05
    mode: Mode = Mode.COLLECTIVE
    servers: int = 1
    server_addresses: tuple[tuple[tuple[str, int], ...], ...] = ()
    pull_bound: float = 0.0
    packet_bytes: int = 1024
    priority: PriorityPolicy = field(default_factory=PriorityPolicy)
    paths: int = 1
    addresses: tuple[tuple[str, ...], ...] | None = None
    dscp: bool = False
    rate_mbit: float | None = None
    send_buffer_kb: int = 128
    copies: int = 1
    error_feedback: bool = True
    compressor: Compressor | None = None
    deadline_factor: float = 2.0
    min_deadline_s: float = 0.002
    initial_deadline_s: float = 0.05
    max_deadline_s: float = 1.0
    timeout_s: float = 60.0
    linger_s: float = 10.0
    seed: int = 0
    loss: LossInjection | None = None

    def __post_init__(self) -> None:
        _number("bound", self.bound, 0.0, 1.0, open_high=True)
        if not isinstance(self.mode, Mode):
            raise TypeError(f"`mode` must be a Mode, got {self.mode!r}.")
        _integer("servers", self.servers, 1)
        _number("pull_bound", self.pull_bound, 0.0, self.bound)
        if self.mode is not Mode.PS and self.pull_bound:
            raise ValueError("`pull_bound` applies to Mode.PS only: the other modes deliver every result.")
        if self.mode is Mode.DIRECT and self.bound:
            raise ValueError(
                f"Mode.DIRECT is reliable: every rank sums what it received itself, so with `bound` "
                f"{self.bound!r} two ranks missing different packets would drift apart. Use bound=0, "
                "or Mode.COLLECTIVE for bounded loss."
            )
        _integer("packet_bytes", self.packet_bytes, 8)
        if self.packet_bytes % 8 or self.packet_bytes > 65_000:
            raise ValueError(
                f"The value of `packet_bytes` is {self.packet_bytes!r}, "
                "but must be a multiple of 8 in [8, 65000]."
            )
        if not isinstance(self.priority, PriorityPolicy):
            raise TypeError(f"`priority` must be a PriorityPolicy, got {type(self.priority).__name__}.")
        _integer("paths", self.paths, 1)
        for shard in self.server_addresses:
            if len(shard) != self.paths:
                raise ValueError(
                    f"Each entry of `server_addresses` needs one (host, port) per path, got {shard!r}."
                )
        if self.addresses is not None and any(len(a) != self.paths for a in self.addresses):
            raise ValueError(f"Each entry of `addresses` needs one address per path ({self.paths}).")
        _integer("send_buffer_kb", self.send_buffer_kb, 4)
        _integer("copies", self.copies, 1)
        if self.rate_mbit is not None:
            _number("rate_mbit", self.rate_mbit, 1e-3, 1e6)
        if not isinstance(self.error_feedback, bool) or not isinstance(self.dscp, bool):
            raise TypeError("`error_feedback` and `dscp` must be bools.")
        if self.compressor is not None and not isinstance(self.compressor, Compressor):
            raise TypeError(
                f"`compressor` must be a dtune.comm.Compressor, got {type(self.compressor).__name__}."
            )
        _number("deadline_factor", self.deadline_factor, 1.0, 100.0)
        _number("min_deadline_s", self.min_deadline_s, 0.0, 60.0)
        _number("initial_deadline_s", self.initial_deadline_s, self.min_deadline_s, 60.0)
        _number("max_deadline_s", self.max_deadline_s, self.min_deadline_s, 600.0)
        _number("timeout_s", self.timeout_s, 0.01, 86_400.0)
        _number("linger_s", self.linger_s, 0.0, 600.0)
        _integer("seed", self.seed, 0)
        if self.loss is not None and not isinstance(self.loss, LossInjection):
            raise TypeError(f"`loss` must be a LossInjection, got {type(self.loss).__name__}.")

    def ddp_hook(self) -> tuple[DLCPState, Any]:
        """``(state, hook)`` for ``DistributedDataParallel.register_comm_hook``.

        Collective over the process group (the ranks exchange their data-plane addresses):
        call it on every rank. The hook completes its future from DLCP's loop thread, so
        communication overlaps the rest of the backward pass.
        """
        from dtune.comm.dlcp._state import DLCPState, dlcp_hook

        state = DLCPState(self)
        object.__setattr__(self, "_state", state)
        return state, dlcp_hook

    def stats(self) -> dict[str, float]:
        """The newest state's statistics (empty before :meth:`ddp_hook`)."""
        state = getattr(self, "_state", None)
        return state.stats() if state is not None else {}

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_state"}
