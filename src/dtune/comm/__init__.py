"""Gradient compression: compressors, error-feedback memory, DDP hooks, exact accounting.

One contract (:class:`Compressor`: ``compress``, ``decompress``, ``aggregate``, with the
collective chosen by the compressor), error feedback as a separate :class:`Memory`, and one
adapter that runs any compressor as a PyTorch DDP communication hook::

    from dtune import comm, train

    compressor = comm.TopK(ratio=0.01)
    ddp_model.register_comm_hook(*comm.ddp_hook(compressor))        # plain PyTorch DDP
    strategy = train.AllReduce(compression=compressor)              # or dtune's strategy
    dtune.report({"loss": loss, **compressor.stats()})              # bytes sent, ratio, CPU time

Compressors: :class:`FP16`, :class:`BF16` (:class:`Cast`), :class:`TopK`, :class:`RandomK`,
:class:`QSGD`, :class:`EFSignSGD`, :class:`PowerSGD`, :class:`Threshold` (DCT). This layer
knows nothing of trials; it imports torch.
"""

from dtune.comm import dlcp
from dtune.comm._base import BucketState, Collective, Compressor, Payload
from dtune.comm._cast import BF16, FP16, Cast, Precision
from dtune.comm._communicator import Communicator
from dtune.comm._hook import CommState, ddp_hook
from dtune.comm._memory import Memory, NoMemory, ResidualMemory
from dtune.comm._powersgd import PowerSGD
from dtune.comm._qsgd import QSGD
from dtune.comm._randomk import RandomK
from dtune.comm._sign import EFSignSGD
from dtune.comm._stats import Accounting
from dtune.comm._threshold import Threshold
from dtune.comm._topk import Selection, TopK
from dtune.comm.dlcp import DLCP

__all__ = [
    "BF16",
    "DLCP",
    "FP16",
    "QSGD",
    "Accounting",
    "BucketState",
    "Cast",
    "Collective",
    "CommState",
    "Communicator",
    "Compressor",
    "EFSignSGD",
    "Memory",
    "NoMemory",
    "Payload",
    "PowerSGD",
    "Precision",
    "RandomK",
    "ResidualMemory",
    "Selection",
    "Threshold",
    "TopK",
    "ddp_hook",
    "dlcp",
]
