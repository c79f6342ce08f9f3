"""DLCP: a bounded-loss, priority-packet gradient transport (parameter server and collective).

Wang et al., "Domain-specific Communication Optimization for Distributed DNN Training"
(arXiv 2008.08445; published as MLT, "Towards Domain-Specific Network Transport for
Distributed DNN Training", NSDI 2024). torch.distributed collectives are reliable and
all-or-nothing, so bounded loss needs its own data plane: gradients travel as self-describing
UDP packets (:class:`Packetizer`), classed by layer and magnitude (:class:`PriorityPolicy`),
sent most important first and optionally DSCP-marked and sprayed over paths
(:class:`Transport`); a receiver completes a reduction once its adaptive deadline passed with at
least ``1 - bound`` of the packets and every protected one (:class:`Reduction`), requests the
rest otherwise, and averages each packet over the senders that contributed. Error feedback
re-sends what was dropped. torch.distributed stays the control plane (rendezvous, address
exchange, replica checks)::

    from dtune import train
    from dtune.comm.dlcp import DLCP, Mode

    strategy = train.AllReduce(compression=DLCP(bound=0.05))                 # collective mode
    strategy = train.AllReduce(compression=DLCP(bound=0.05, mode=Mode.PS))   # shard on rank 0
    small = DLCP(bound=0.0, mode=Mode.DIRECT, copies=2, compressor=comm.PowerSGD(rank=4))  # one trip
    ddp.register_comm_hook(*DLCP(bound=0.01, compressor=comm.FP16()).ddp_hook())
"""

from dtune.comm.dlcp._aggregator import Aggregator
from dtune.comm.dlcp._communicator import DLCPCommunicator
from dtune.comm.dlcp._config import DLCP, Mode
from dtune.comm.dlcp._deadline import AdaptiveDeadline
from dtune.comm.dlcp._node import Node
from dtune.comm.dlcp._packet import HEADER, HEADER_BYTES, Flag, Kind, Packetizer
from dtune.comm.dlcp._priority import DSCP_OF_CLASS, LayerRule, PriorityPolicy
from dtune.comm.dlcp._reduction import Assembly, Outcome, Reduction
from dtune.comm.dlcp._server import serve
from dtune.comm.dlcp._state import DLCPState, ReplicaDivergence, check_replicas, dlcp_hook, parameter_checksum
from dtune.comm.dlcp._transport import LossInjection, Transport
from dtune.comm.dlcp._worker import Worker

__all__ = [
    "DLCP",
    "DSCP_OF_CLASS",
    "HEADER",
    "HEADER_BYTES",
    "AdaptiveDeadline",
    "Aggregator",
    "Assembly",
    "DLCPCommunicator",
    "DLCPState",
    "Flag",
    "Kind",
    "LayerRule",
    "LossInjection",
    "Mode",
    "Node",
    "Outcome",
    "Packetizer",
    "PriorityPolicy",
    "Reduction",
    "ReplicaDivergence",
    "Transport",
    "Worker",
    "check_replicas",
    "dlcp_hook",
    "parameter_checksum",
    "serve",
]
