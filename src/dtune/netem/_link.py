"""What an emulated link does (:class:`Link`) and what else shares it (:class:`BulkFlow`)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BulkFlow", "Link"]


def _positive(name: str, value: float | None, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}.")
    if not value > 0:
        raise ValueError(f"The value of `{name}` is {value!r}, but must be > 0.")


@dataclass(frozen=True, kw_only=True)
class Link:
    """How every host's access link behaves (both directions).

    ``rate_mbit``: token-bucket rate (None: unshaped veth, tens of Gbit/s). ``loss``: fraction
    of arriving packets dropped at random. ``burst_kb``: bucket size (default: 64 KB, or 1 ms of
    traffic above 512 Mbit/s). ``queue_ms``: how long a packet may wait in the bucket's queue
    before it is dropped (the queue holds ``rate * queue_ms``). ``delay_ms``: fixed one-way delay,
    only where the kernel has ``netem``.

    Example:
        >>> from dtune import netem
        >>> netem.Link(rate_mbit=100, loss=0.01)
        Link(rate_mbit=100, loss=0.01, burst_kb=None, queue_ms=100.0, delay_ms=0.0)
    """

    rate_mbit: float | None = None
    loss: float = 0.0
    burst_kb: float | None = None
    queue_ms: float = 100.0
    delay_ms: float = 0.0

    def __post_init__(self) -> None:
        _positive("rate_mbit", self.rate_mbit)
        _positive("burst_kb", self.burst_kb)
        _positive("queue_ms", self.queue_ms, allow_none=False)
        for name in ("loss", "delay_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"`{name}` must be a number, got {type(value).__name__}.")
        if not 0 <= self.loss < 1:
            raise ValueError(f"The value of `loss` is {self.loss!r}, but must be in [0, 1).")
        if self.delay_ms < 0:
            raise ValueError(f"The value of `delay_ms` is {self.delay_ms!r}, but must be >= 0.")

    def burst_bytes(self) -> int:
        if self.burst_kb is not None:
            return int(self.burst_kb * 1024)
        rate = self.rate_mbit or 0.0
        return max(64 * 1024, int(rate * 1e6 / 8 / 1000))  # at least 1 ms at the rate


@dataclass(frozen=True, kw_only=True)
class BulkFlow:
    """A background TCP flow from host ``src`` to host ``dst``, sharing their links.

    Bounded: it lives at most as long as the network (``seconds`` ends it sooner) and
    ``rate_mbit`` paces it (None: it takes what TCP gets, a fair share of the bottleneck).

    Example:
        >>> from dtune import netem
        >>> flows = (netem.BulkFlow(src=0, dst=1), netem.BulkFlow(src=1, dst=0, rate_mbit=20))
    """

    src: int
    dst: int
    rate_mbit: float | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        for name in ("src", "dst"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"The value of `{name}` is {value!r}, but must be an integer >= 0.")
        if self.src == self.dst:
            raise ValueError(f"The value of `dst` is {self.dst!r}, but must differ from `src`.")
        _positive("rate_mbit", self.rate_mbit)
        _positive("seconds", self.seconds)
