"""Measuring an emulated link: a bounded bulk TCP transfer between two hosts."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

from dtune.netem._network import BULK_SCRIPT, Network
from dtune.netem._tools import NetemError

__all__ = ["Throughput", "measure_throughput"]


@dataclass(frozen=True)
class Throughput:
    """One transfer: application bytes, bytes on the sender's wire, and how long it took."""

    nbytes: int
    wire_bytes: int
    seconds: float

    @property
    def goodput_mbit(self) -> float:
        """Application data rate (below the link rate by the TCP/IP headers, ~3.5% at MTU 1500)."""
        return self.nbytes * 8 / self.seconds / 1e6

    @property
    def wire_mbit(self) -> float:
        """Rate on the wire, headers included: what a token bucket limits."""
        return self.wire_bytes * 8 / self.seconds / 1e6


def measure_throughput(
    network: Network,
    src: int = 0,
    dst: int = 1,
    nbytes: int = 12_500_000,
    port: int = 5299,
    timeout_s: float = 120,
) -> Throughput:
    """Send ``nbytes`` from host ``src`` to ``dst`` over TCP; time it at the receiver.

    The time runs from the first byte received to the last, so connection set-up does not
    count; wire bytes are the sender interface's transmit counter over the transfer.

    Example (root only)::

        with netem.Network(link=netem.Link(rate_mbit=100)) as net:
            print(netem.measure_throughput(net).wire_mbit)  # about 100
    """
    before = network.counters(src)["tx_bytes"]
    receiver = network.spawn(
        dst,
        [sys.executable, BULK_SCRIPT, "recv", "--port", str(port), "--bytes", str(nbytes)],
        stdout=subprocess.PIPE,
    )
    try:
        if receiver.stdout is None or receiver.stdout.readline().strip() != b"listening":
            raise NetemError(f"the receiver on host {dst} did not start")
        sender = network.spawn(
            src,
            [sys.executable, BULK_SCRIPT, "send", "--addr", network.address(dst), "--port", str(port),
             "--bytes", str(nbytes)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        out, _ = receiver.communicate(timeout=timeout_s)
        sender.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise NetemError(f"a {nbytes}-byte transfer took more than {timeout_s} s") from exc
    result = json.loads(out.decode().strip().splitlines()[-1])
    if result["bytes"] != nbytes or result["last"] <= result["first"]:
        raise NetemError(f"the transfer delivered {result['bytes']} of {nbytes} bytes")
    wire = network.counters(src)["tx_bytes"] - before
    return Throughput(nbytes=nbytes, wire_bytes=wire, seconds=result["last"] - result["first"])
