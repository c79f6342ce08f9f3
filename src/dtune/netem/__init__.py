"""Network emulation: each rank in its own network namespace, on shaped and lossy links.

Shows what a communication method buys on a 100 Mbit/s or lossy link without leaving one
machine: hosts are network namespaces joined by veth links (a bridge beyond two), rate-limited
with ``tc tbf``, made lossy with nftables on the receiving side, optionally shared with bounded
background bulk flows. Needs root; everything lives in namespaces it creates (addresses
``10.250.0.x`` inside them) and is torn down on exit, error or Ctrl-C. Kernels without the
``netem`` qdisc cannot add fixed delay: :func:`probe` says what this one offers.

Example (root only)::

    from dtune import netem

    print(netem.probe().describe())
    with netem.Network(hosts=2, link=netem.Link(rate_mbit=100, loss=0.01)) as net:
        rank0 = net.spawn(0, ["python", "train.py", "--rank", "0"], env=net.torch_env(0))
        rank1 = net.spawn(1, ["python", "train.py", "--rank", "1"], env=net.torch_env(1))
        rank0.wait(); rank1.wait()

Nothing here imports torch.
"""

from dtune.netem._link import BulkFlow, Link
from dtune.netem._measure import Throughput, measure_throughput
from dtune.netem._network import Network, cleanup_stale
from dtune.netem._tools import (
    Capabilities,
    NetemError,
    NetemUnavailable,
    probe,
    require_root,
    require_tools,
)

__all__ = [
    "BulkFlow",
    "Capabilities",
    "Link",
    "NetemError",
    "NetemUnavailable",
    "Network",
    "Throughput",
    "cleanup_stale",
    "measure_throughput",
    "probe",
    "require_root",
    "require_tools",
]
