"""Network emulation: shaped rates, loss, bridges, background flows, and teardown in every case."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from dtune import netem
from dtune.netem._network import _namespaces
from dtune.netem._tools import PREFIX

ROOT = os.geteuid() == 0
TOOLS = shutil.which("ip") is not None and shutil.which("tc") is not None
needs_root = pytest.mark.skipif(
    not (ROOT and TOOLS),
    reason="network namespaces need root (CAP_NET_ADMIN) and iproute2's ip and tc",
)
needs_nft = pytest.mark.skipif(
    shutil.which("nft") is None, reason="random loss needs nftables (apt-get install nftables)"
)


def _mine() -> set[str]:
    return {name for name in _namespaces() if name.startswith(f"{PREFIX}{os.getpid()}-")}


@needs_root
def test_a_shaped_link_measures_within_10_percent_of_its_rate_and_teardown_leaves_no_namespace():
    before = _mine()
    with netem.Network(link=netem.Link(rate_mbit=100)) as net:
        created = set(net.namespaces)
        assert created <= _mine() and len(created) == 2
        result = netem.measure_throughput(net, nbytes=12_500_000)  # about one second at 100 Mbit/s
    assert abs(result.wire_mbit - 100) <= 10, result
    assert abs(result.goodput_mbit - 100) <= 10, result  # headers cost ~3.5% at MTU 1500
    assert _mine() == before


@needs_root
@pytest.mark.parametrize("interrupt", [RuntimeError, KeyboardInterrupt])
def test_teardown_also_happens_when_the_run_fails_or_is_interrupted(interrupt):
    before = _mine()
    with pytest.raises(interrupt), netem.Network(link=netem.Link(rate_mbit=50)) as net:
        sleeper = net.spawn(1, ["sleep", "60"])
        raise interrupt("stop")
    assert sleeper.poll() is not None  # stopped, not orphaned inside a deleted namespace
    assert _mine() == before


@needs_root
def test_namespaces_left_by_a_dead_process_are_removed_and_live_ones_kept():
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = f"{PREFIX}{dead.pid}-test-h0", f"{PREFIX}{os.getpid()}-test-h0"
    for name in (stale, live):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert stale in netem.cleanup_stale()
        names = _namespaces()
        assert stale not in names and live in names
    finally:
        for name in (stale, live):
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


@needs_root
@needs_nft
def test_loss_background_flows_and_three_hosts_on_a_bridge():
    flow = netem.BulkFlow(src=2, dst=1, rate_mbit=20)
    with netem.Network(hosts=3, link=netem.Link(rate_mbit=200, loss=0.02), background=(flow,)) as net:
        assert net.switch is not None
        result = netem.measure_throughput(net, src=0, dst=2, nbytes=2_000_000)
        assert result.nbytes == 2_000_000
        deadline = time.monotonic() + 10
        while net.counters(1)["rx_bytes"] < 1_000_000 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert net.counters(1)["rx_bytes"] >= 1_000_000  # the background flow reached host 1
        assert net.counters(2)["loss_drops"] > 0  # packets arriving at host 2 were dropped
    assert net.namespaces == [] and net.switch is None


def test_without_root_the_error_says_so(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(PermissionError, match="needs root"):
        netem.Network().open()
    assert "not root" in netem.probe().describe()


@needs_root
def test_probe_says_what_the_kernel_offers_and_delay_needs_netem():
    capabilities = netem.probe()
    text = capabilities.describe()
    assert capabilities.qdiscs["tbf"] and "rate limits: yes" in text and "fixed delay" in text
    if not capabilities.netem:
        assert "fixed delay: NO" in text
        with pytest.raises(netem.NetemUnavailable, match="netem"):
            netem.Network(link=netem.Link(delay_ms=5)).open()
    assert not {n for n in _namespaces() if n.endswith("-probe")}


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match=r"The value of `loss` is 1.0, but must be in \[0, 1\)\."):
        netem.Link(loss=1.0)
    with pytest.raises(ValueError, match="The value of `rate_mbit` is 0, but must be > 0."):
        netem.Link(rate_mbit=0)
    with pytest.raises(ValueError, match="The value of `hosts` is 1, but must be an integer >= 2."):
        netem.Network(hosts=1)
    with pytest.raises(ValueError, match="names a host >= hosts"):
        netem.Network(hosts=2, background=(netem.BulkFlow(src=0, dst=2),))
    with pytest.raises(ValueError, match="must differ from `src`"):
        netem.BulkFlow(src=1, dst=1)


def test_docstring_examples_run():
    import doctest
    import importlib
    import pkgutil

    import dtune.netem

    for info in pkgutil.iter_modules(dtune.netem.__path__):
        result = doctest.testmod(importlib.import_module(f"dtune.netem.{info.name}"))
        assert result.failed == 0, info.name
