"""Emulated networks: one network namespace per host, veth links, tc rate limits, nftables loss.

Two hosts are joined by one veth pair; more hang off a bridge in a "switch" namespace. Every
host's interface is ``dt0`` with address ``10.250.0.<i+1>/24`` (the namespaces are private, so
these addresses never meet the machine's own). A :class:`Link` shapes each host's access link
in both directions with a token bucket (``tbf``: host egress, and the switch port toward the
host), drops a random fraction of the packets *arriving* at each host (nftables ``numgen`` on
the input hook: dropping on the sender's output would be seen by TCP as a local error, not as
wire loss), and adds fixed delay only where the kernel has ``netem``. Optional bounded
:class:`BulkFlow` s share the bottleneck with whatever the hosts run.

Everything is created under names ``dtnetem-<pid>-<token>-...`` and deleted when the network
closes, also after an exception or Ctrl-C; namespaces left by a killed process (its pid no
longer alive) are removed by :func:`cleanup_stale`, which every new network calls first.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from dtune.netem._link import BulkFlow, Link
from dtune.netem._tools import PREFIX, NetemError, NetemUnavailable, probe, require_root, require_tools, run

__all__ = ["Network", "cleanup_stale"]

IFACE = "dt0"
SUBNET = "10.250.0"
BULK_SCRIPT = str(Path(__file__).with_name("_bulk.py"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespaces() -> list[str]:
    listing = run(["ip", "-j", "netns", "list"], check=False).stdout.strip()
    return [entry["name"] for entry in json.loads(listing or "[]")]


def _kill_inside(namespace: str) -> None:
    """Kill whatever still runs in ``namespace`` (only ever one of ours)."""
    pids = run(["ip", "netns", "pids", namespace], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def cleanup_stale(prefix: str = PREFIX) -> list[str]:
    """Delete namespaces under ``prefix`` whose creating process is gone; return their names."""
    removed = []
    for name in _namespaces():
        if not name.startswith(prefix):
            continue
        owner = name[len(prefix) :].split("-", 1)[0]
        if owner.isdigit() and not _alive(int(owner)):
            _kill_inside(name)
            run(["ip", "netns", "del", name], check=False)
            removed.append(name)
    return removed


@dataclass
class Network:
    """``hosts`` namespaces joined by shaped links; a context manager that always tears down.

    Example (root only)::

        with netem.Network(hosts=2, link=netem.Link(rate_mbit=100, loss=0.01)) as net:
            proc = net.spawn(1, ["python", "-c", "print('hello from host 1')"])
            net.address(0)  # '10.250.0.1'
    """

    hosts: int = 2
    link: Link = field(default_factory=Link)
    background: Sequence[BulkFlow] = ()
    namespaces: list[str] = field(init=False, default_factory=list)
    switch: str | None = field(init=False, default=None)
    _procs: list[subprocess.Popen[Any]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.hosts, bool) or not isinstance(self.hosts, int) or self.hosts < 2:
            raise ValueError(f"The value of `hosts` is {self.hosts!r}, but must be an integer >= 2.")
        if not isinstance(self.link, Link):
            raise TypeError(f"`link` must be a dtune.netem.Link, got {type(self.link).__name__}.")
        for flow in self.background:
            if max(flow.src, flow.dst) >= self.hosts:
                raise ValueError(f"The background flow {flow} names a host >= hosts ({self.hosts}).")

    # -- life cycle ---------------------------------------------------------------------------

    def __enter__(self) -> Network:
        self.open()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def open(self) -> None:
        """Create namespaces, links, shaping and loss rules, then start background flows."""
        require_root()
        require_tools(nft=self.link.loss > 0)
        if self.link.delay_ms > 0 and not probe().netem:
            raise NetemUnavailable(
                f"delay_ms={self.link.delay_ms} needs the netem qdisc, which this kernel lacks "
                "(CONFIG_NET_SCH_NETEM); only rates and loss can be emulated here."
            )
        cleanup_stale()
        token = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        try:
            self._build(token)
            for index, flow in enumerate(self.background):
                self._start_flow(index, flow)
        except BaseException:
            self.close()
            raise

    def _build(self, token: str) -> None:
        for i in range(self.hosts):
            self.namespaces.append(f"{token}-h{i}")
            run(["ip", "netns", "add", self.namespaces[-1]])
        if self.hosts == 2:
            a, b = self.namespaces
            run(["ip", "link", "add", IFACE, "netns", a, "type", "veth", "peer", "name", IFACE, "netns", b])
        else:
            self.switch = f"{token}-sw"
            run(["ip", "netns", "add", self.switch])
            run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
            for i, ns in enumerate(self.namespaces):
                port = f"p{i}"
                run(
                    [
                        "ip",
                        "link",
                        "add",
                        IFACE,
                        "netns",
                        ns,
                        "type",
                        "veth",
                        "peer",
                        "name",
                        port,
                        "netns",
                        self.switch,
                    ]
                )
                run(["ip", "-n", self.switch, "link", "set", port, "master", "br0", "up"])
                self._shape(self.switch, port)
            run(["ip", "-n", self.switch, "link", "set", "br0", "up"])
        for i, ns in enumerate(self.namespaces):
            run(["ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", IFACE])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
            run(["ip", "-n", ns, "link", "set", IFACE, "up"])
            self._shape(ns, IFACE)
            if self.link.loss > 0:
                self._drop_arriving(ns)

    def _shape(self, namespace: str, device: str) -> None:
        link = self.link
        tc = ["tc", "-n", namespace, "qdisc", "add", "dev", device]
        parent = ["root"]
        if link.delay_ms > 0:  # netem at the root, the token bucket as its child
            run([*tc, "root", "handle", "1:", "netem", "delay", f"{link.delay_ms}ms", "limit", "100000"])
            parent = ["parent", "1:1"]
        if link.rate_mbit is not None:
            limit = max(link.burst_bytes(), int(link.rate_mbit * 1e6 / 8 * link.queue_ms / 1000))
            run(
                [*tc, *parent, "handle", "10:", "tbf", "rate", f"{link.rate_mbit}mbit",
                 "burst", str(link.burst_bytes()), "limit", str(limit)]
            )  # fmt: skip

    def _drop_arriving(self, namespace: str) -> None:
        per_million = round(self.link.loss * 1_000_000)
        rules = (
            "add table inet dtnetem; "
            "add chain inet dtnetem arriving { type filter hook input priority 0; policy accept; }; "
            f'add rule inet dtnetem arriving iifname "{IFACE}" numgen random mod 1000000 < {per_million} '
            "counter drop"
        )
        run(["ip", "netns", "exec", namespace, "nft", rules])

    def _start_flow(self, index: int, flow: BulkFlow) -> None:
        port = str(5201 + index)
        receiver = self.spawn(
            flow.dst, [sys.executable, BULK_SCRIPT, "recv", "--port", port], stdout=subprocess.PIPE
        )
        if receiver.stdout is None or receiver.stdout.readline().strip() != b"listening":
            raise NetemError(f"the background receiver on host {flow.dst} did not start")
        args = ["send", "--addr", self.address(flow.dst), "--port", port]
        args += ["--rate", str(flow.rate_mbit)] if flow.rate_mbit else []
        args += ["--seconds", str(flow.seconds)] if flow.seconds else []
        self.spawn(flow.src, [sys.executable, BULK_SCRIPT, *args], stdout=subprocess.DEVNULL)

    def close(self) -> None:
        """Stop every process started here, then delete every namespace (idempotent)."""
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self._procs:
            try:
                proc.wait(timeout=3.0)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self._procs.clear()
        for namespace in [*self.namespaces, *([self.switch] if self.switch else [])]:
            _kill_inside(namespace)
            run(["ip", "netns", "del", namespace], check=False)
        self.namespaces.clear()
        self.switch = None

    # -- using it -----------------------------------------------------------------------------

    def address(self, host: int) -> str:
        """Host ``host``'s address on the emulated network."""
        return f"{SUBNET}.{host + 1}"

    def spawn(
        self, host: int, argv: Sequence[str], *, env: Mapping[str, str] | None = None, **popen: Any
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` inside host ``host``'s namespace; it is stopped when the network closes."""
        if not 0 <= host < len(self.namespaces):
            raise ValueError(f"The value of `host` is {host!r}, but must be in [0, {len(self.namespaces)}).")
        full_env = {**os.environ, **(env or {})}
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.namespaces[host], *argv],
            env=full_env,
            start_new_session=True,
            **popen,
        )
        self._procs.append(proc)
        return proc

    def torch_env(self, host: int, port: int = 29500) -> dict[str, str]:
        """Environment for a torch.distributed rank on ``host``, meeting rank 0 on host 0.

        gloo is pinned to the emulated interface, and dtune's runtime rendezvous points there
        too (``DTUNE_RENDEZVOUS_ADDR``).
        """
        return {
            "MASTER_ADDR": self.address(0),
            "MASTER_PORT": str(port),
            "GLOO_SOCKET_IFNAME": IFACE,
            "DTUNE_RENDEZVOUS_ADDR": self.address(0),
        }

    def counters(self, host: int) -> dict[str, int]:
        """Bytes and packets through host ``host``'s interface, and what shaping and loss dropped."""
        namespace = self.namespaces[host]
        link = json.loads(run(["ip", "-j", "-s", "-n", namespace, "link", "show", "dev", IFACE]).stdout)[0]
        out = {
            "tx_bytes": link["stats64"]["tx"]["bytes"],
            "rx_bytes": link["stats64"]["rx"]["bytes"],
            "tx_packets": link["stats64"]["tx"]["packets"],
            "rx_packets": link["stats64"]["rx"]["packets"],
        }
        qdiscs = json.loads(run(["tc", "-s", "-j", "-n", namespace, "qdisc", "show", "dev", IFACE]).stdout)
        out["shaper_drops"] = sum(q.get("drops", 0) for q in qdiscs if q.get("kind") in ("tbf", "netem"))
        out["loss_drops"] = 0
        if self.link.loss > 0:
            ruleset = run(["ip", "netns", "exec", namespace, "nft", "-j", "list", "table", "inet", "dtnetem"])
            for item in json.loads(ruleset.stdout)["nftables"]:
                for expr in item.get("rule", {}).get("expr", []):
                    if "counter" in expr:
                        out["loss_drops"] += expr["counter"]["packets"]
        return out
