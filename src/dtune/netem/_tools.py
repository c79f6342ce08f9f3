"""What network emulation needs (root, ``ip``, ``tc``, ``nft``) and what this kernel offers.

Kernels differ in which queueing disciplines they carry: the machines dtune was developed on
have ``tbf``, ``htb``, ``bfifo``, ``pfifo`` and the ``u32`` classifier but no ``netem``, so no
fixed delay or jitter can be emulated there. :func:`probe` finds out by trying each one on a
veth pair inside a throw-away namespace, and :meth:`Capabilities.describe` says so in words.
"""

from __future__ import annotations

import gzip
import os
import platform
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Capabilities", "NetemError", "NetemUnavailable", "probe", "require_root", "require_tools"]

PREFIX = "dtnetem-"  # every namespace dtune creates starts with this, then the creator's pid

_RED_ARGS = "limit 400000 min 30000 max 90000 avpkt 1000 burst 55 probability 0.02 bandwidth 10mbit"

# qdiscs worth knowing about, each with the smallest arguments it accepts
_QDISCS = {
    "tbf": ["rate", "1mbit", "burst", "32kb", "latency", "50ms"],
    "htb": [],
    "bfifo": [],
    "pfifo": [],
    "netem": ["delay", "1ms"],
    "prio": [],
    "red": _RED_ARGS.split(" "),
    "sfq": [],
    "fq": [],
    "fq_codel": [],
    "cake": [],
}

_INSTALL_HINT = "install them with `apt-get install -y iproute2 nftables` (Debian/Ubuntu)"


class NetemError(RuntimeError):
    """A command of the emulation failed; the message holds the command and its stderr."""


class NetemUnavailable(NetemError):
    """What was asked for needs something this machine lacks (root, a tool, a qdisc)."""


def require_root() -> None:
    """Raise :class:`PermissionError` unless this process may create network namespaces."""
    if os.geteuid() != 0:
        raise PermissionError(
            "dtune.netem needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) to create network namespaces, "
            "veth links and tc/nftables rules; run as root, or leave network emulation out."
        )


def require_tools(nft: bool = False) -> None:
    """Raise :class:`NetemUnavailable` naming whichever of ``ip``, ``tc`` (``nft``) is missing."""
    missing = [tool for tool in ("ip", "tc", *(["nft"] if nft else [])) if shutil.which(tool) is None]
    if missing:
        raise NetemUnavailable(f"dtune.netem needs {', '.join(missing)} on PATH; {_INSTALL_HINT}.")


def run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command of the emulation; with ``check``, a failure raises :class:`NetemError`."""
    done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise NetemError(f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _kernel_config(option: str) -> str:
    try:
        with gzip.open("/proc/config.gz", "rt") as config:
            for line in config:
                if line.startswith(f"{option}="):
                    return line.strip().split("=", 1)[1]
                if line.startswith(f"# {option} is not set"):
                    return "not set"
    except OSError:
        pass
    return "unknown"


@dataclass(frozen=True)
class Capabilities:
    """What this machine offers for emulation (see :func:`probe`)."""

    root: bool
    tools: dict[str, str | None]
    qdiscs: dict[str, bool] = field(default_factory=dict)
    nft_loss: bool = False
    kernel: str = ""
    netem_config: str = "unknown"

    @property
    def netem(self) -> bool:
        """Whether fixed delay can be emulated (the ``netem`` qdisc)."""
        return self.qdiscs.get("netem", False)

    def describe(self) -> str:
        """One paragraph: what can and cannot be emulated here, and why."""
        if not self.root:
            return "not root: network namespaces cannot be created, so nothing can be emulated"
        have = [k for k, ok in self.qdiscs.items() if ok]
        lack = [k for k, ok in self.qdiscs.items() if not ok]
        missing_tools = [t for t, path in self.tools.items() if path is None]
        parts = [
            f"kernel {self.kernel}",
            f"tc qdiscs available: {', '.join(have) or 'none'}",
            f"missing: {', '.join(lack) or 'none'}",
            "rate limits: yes (tbf)" if self.qdiscs.get("tbf") else "rate limits: NO (no tbf)",
            "random loss: yes (nftables numgen on the receiver's input hook)"
            if self.nft_loss
            else "random loss: NO (nftables missing or refused)",
            "fixed delay: yes (netem)"
            if self.netem
            else f"fixed delay: NO (no netem qdisc; CONFIG_NET_SCH_NETEM {self.netem_config})",
        ]
        if missing_tools:
            parts.append(f"missing tools: {', '.join(missing_tools)} ({_INSTALL_HINT})")
        return "; ".join(parts)


def probe() -> Capabilities:
    """Try each qdisc and an nftables loss rule in a throw-away namespace (root only)."""
    tools = {tool: shutil.which(tool) for tool in ("ip", "tc", "nft")}
    base = Capabilities(
        root=os.geteuid() == 0,
        tools=tools,
        kernel=platform.release(),
        netem_config=_kernel_config("CONFIG_NET_SCH_NETEM"),
    )
    if not base.root or tools["ip"] is None or tools["tc"] is None:
        return base
    name = f"{PREFIX}{os.getpid()}-probe"
    run(["ip", "netns", "add", name])
    try:
        run(["ip", "-n", name, "link", "add", "pa", "type", "veth", "peer", "name", "pb"])
        qdiscs = {}
        for kind, args in _QDISCS.items():
            added = run(["tc", "-n", name, "qdisc", "add", "dev", "pa", "root", kind, *args], check=False)
            qdiscs[kind] = added.returncode == 0
            if qdiscs[kind]:
                run(["tc", "-n", name, "qdisc", "del", "dev", "pa", "root"], check=False)
        nft_loss = False
        if tools["nft"] is not None:
            rule = "add table inet probe; add chain inet probe in { type filter hook input priority 0; }; "
            rule += 'add rule inet probe in iifname "pb" numgen random mod 1000 < 1 counter drop'
            nft_loss = run(["ip", "netns", "exec", name, "nft", rule], check=False).returncode == 0
    finally:
        run(["ip", "netns", "del", name], check=False)
    return Capabilities(
        root=True,
        tools=tools,
        qdiscs=qdiscs,
        nft_loss=nft_loss,
        kernel=base.kernel,
        netem_config=base.netem_config,
    )
