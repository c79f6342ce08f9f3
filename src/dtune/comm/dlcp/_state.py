"""DLCP's per-model state and its DDP communication hook.

DLCP (Wang et al., "Domain-specific Communication Optimization for Distributed DNN Training")
plugs into training frameworks where they reduce gradients; in PyTorch that is a DDP
communication hook. :class:`DLCPState` owns a :class:`dtune.comm.CommState` (the compressor,
its error-feedback memory and accounting) whose communicator is DLCP's, the data-plane
threads and sockets, and the map from parameters to layer positions that the layer rule of
the priority policy needs. The hook returns a future that DLCP's loop thread completes, so
communication overlaps the rest of the backward pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import weakref
from typing import Any

import torch
import torch.distributed

from dtune.comm._cast import Cast, Precision
from dtune.comm._hook import CommState
from dtune.comm.dlcp._communicator import DLCPCommunicator
from dtune.comm.dlcp._config import DLCP, MAX_WORKERS
from dtune.runtime import distributed

__all__ = ["DLCPState", "ReplicaDivergence", "check_replicas", "dlcp_hook", "parameter_checksum"]


class ReplicaDivergence(RuntimeError):
    """Model replicas that should be identical are not."""


def parameter_checksum(model: torch.nn.Module) -> str:
    """A digest of every parameter's bytes (replicas in sync have equal digests)."""
    digest = hashlib.blake2b(digest_size=16)
    for parameter in model.parameters():
        digest.update(parameter.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_replicas(model: torch.nn.Module) -> str:
    """Raise :class:`ReplicaDivergence` unless every rank's parameters are bit-identical.

    Collective (over torch.distributed, the control plane); returns the common checksum.
    """
    mine = parameter_checksum(model)
    everyone = distributed.all_gather_object(mine)
    if len(set(everyone)) > 1:
        raise ReplicaDivergence(f"Replicas differ: parameter checksums per rank {everyone}.")
    return mine


class DLCPState:
    """The state behind :meth:`DLCP.ddp_hook`: compressor state, DLCP data plane, layer map.

    ``bind(model)`` tells the layer rule the model's parameter order; without it, parameters
    are numbered in the order the first step's buckets list them. ``close()`` stops the
    threads and closes the sockets (also when the process leaves its group, and on exit).

    Example:
        >>> import torch
        >>> from dtune.comm.dlcp import DLCP
        >>> state, hook = DLCP(bound=0.05).ddp_hook()  # one process: averaging is the identity
        >>> grads = [torch.ones(3)]
        >>> state.all_reduce(grads)
        >>> grads[0].tolist()
        [1.0, 1.0, 1.0]
        >>> state.close()
    """

    def __init__(self, config: DLCP) -> None:
        world = distributed.world_size()
        if world > MAX_WORKERS:
            raise ValueError(f"The value of `world_size` is {world}, but must be <= {MAX_WORKERS} for DLCP.")
        self.config = config
        compressor = config.compressor if config.compressor is not None else Cast(precision=Precision.FP32)
        self.comm_state = CommState(compressor, seed=config.seed)
        stable = config.compressor is None or isinstance(config.compressor, Cast)
        self.communicator = DLCPCommunicator(config, self.comm_state.accounting, stable_coordinates=stable)
        self.comm_state.comm = self.communicator  # type: ignore[assignment]  # same shape as Communicator
        self._layer_of: dict[int, int] = {}
        self._bound = False
        self._closed = False
        distributed.on_group_exit(self.close)
        self._finalizer = weakref.finalize(self, self.communicator.close)

    @property
    def step(self) -> int:
        return self.comm_state.step

    def bind(self, model: torch.nn.Module) -> DLCPState:
        """Number the layers in ``model``'s parameter order (the layer rule's positions)."""
        self._layer_of = {id(p): i for i, p in enumerate(model.parameters())}
        self._bound = True
        self.communicator.layers.clear()
        return self

    def note_bucket(self, index: int, parameters: list[torch.Tensor]) -> None:
        """Record which layers bucket ``index`` holds (from its parameters, in bucket order)."""
        import numpy as np

        for parameter in parameters:
            if id(parameter) not in self._layer_of and not self._bound:
                self._layer_of[id(parameter)] = len(self._layer_of)
        sizes = np.array([p.numel() for p in parameters], dtype=np.int64)
        ids = np.array([self._layer_of.get(id(p), 0) for p in parameters], dtype=np.int64)
        self.communicator.layers[index] = (np.cumsum(sizes), ids, max(len(self._layer_of), 1))

    def all_reduce(self, tensors: list[torch.Tensor], *, bucket: int = 0) -> None:
        """Average ``tensors`` across ranks in place over DLCP, as one bucket; one call is one step."""
        self.comm_state.all_reduce(tensors, bucket=bucket)

    def stats(self) -> dict[str, float]:
        """Compressor accounting (``comm_*``) and the data plane's counters (``dlcp_*``)."""
        return {**self.comm_state.stats(), **self.communicator.stats()}

    @property
    def loss_log(self) -> list[dict[str, Any]]:
        """Per reduction: step, bucket, round, realised loss per class of this rank's packets."""
        return list(self.communicator.log)

    def state_dict(self) -> dict[str, Any]:
        return {
            "comm": self.comm_state.state_dict(),
            "residuals": {k: v.clone() for k, v in self.communicator.residuals.items()},
            "ages": {k: v.copy() for k, v in self.communicator.ages.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.comm_state.load_state_dict(state["comm"])
        self.communicator.residuals = {tuple(k): v.clone() for k, v in state.get("residuals", {}).items()}
        self.communicator.ages = {tuple(k): v.copy() for k, v in state.get("ages", {}).items()}

    def close(self) -> None:
        """Stop the data-plane threads and close its sockets (idempotent)."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(Exception):
                self._finalizer()

    def __enter__(self) -> DLCPState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dlcp_hook(state: DLCPState, bucket: Any) -> torch.futures.Future[torch.Tensor]:
    """The DDP communication hook: average ``bucket`` over DLCP (future completed by DLCP's thread)."""
    params = list(bucket.parameters())
    state.note_bucket(bucket.index(), params)
    shapes = tuple(g.shape for g in bucket.gradients())
    fut = state.comm_state.exchange(bucket.index(), bucket.buffer(), shapes)
    if bucket.is_last():
        state.comm_state.end_step()
    return fut


# DDP inspects the hook's annotations and wants objects, not the strings of postponed annotations
dlcp_hook.__annotations__ = {
    "state": DLCPState,
    "bucket": torch.distributed.GradBucket,  # type: ignore[attr-defined]
    "return": torch.futures.Future[torch.Tensor],
}
