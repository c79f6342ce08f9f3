"""PowerSGD: rank-r approximation by one step of power iteration, warm-started, error feedback.

Vogels et al., "PowerSGD: Practical Low-Rank Gradient Compression for Distributed
Optimization" (NeurIPS 2019). Each gradient matrix ``M`` (n x m, a tensor viewed as
``shape[0] x rest``) is approximated as ``P Q^T``: ``P = M Q`` is all-reduced and
orthonormalized, ``Q = M^T P`` is all-reduced, and because both products are linear in ``M``
the all-reduced factors are those of the average gradient. Reusing the last step's ``Q``
(warm start) makes the single power step converge over iterations. What is left stays as error
feedback, the paper's ``e_w = Delta_w - P Q^T`` (this rank's gradient minus the *mean*
approximation, so errors sum to the global approximation error). 1-D tensors (biases), and
matrices too small for rank r to pay (``(n + m) r * min_compression_rate >= n m``), are
all-reduced uncompressed together with the ``P`` factors, so each step costs two all-reduces,
as in PyTorch's ``powerSGD_hook``.

``Q`` starts from the bucket's shared generator, identical on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dtune.comm._base import BucketState, Collective, Compressor, Payload, check_int
from dtune.comm._communicator import Communicator
from dtune.comm._memory import Memory

__all__ = ["PowerSGD"]


def orthonormalize(matrix: torch.Tensor, eps: float) -> None:
    """Orthonormal columns spanning those of ``matrix``, in place.

    One column is normalized (``eps`` keeps a zero column zero). Several go through a
    Householder QR: Gram-Schmidt in fp32 loses orthogonality on the ill-conditioned P of a
    nearly low-rank gradient, and then P P^T is no projection.
    """
    if matrix.shape[1] == 1:
        matrix.div_(matrix.norm() + eps)
    else:
        matrix.copy_(torch.linalg.qr(matrix, mode="reduced").Q)


@dataclass(frozen=True, kw_only=True)
class PowerSGD(Compressor):
    """Rank-``rank`` PowerSGD with warm start and error feedback.

    ``eps`` is added to column norms in the orthonormalization, so an all-zero gradient matrix
    stays zero instead of dividing by zero.

    Example:
        >>> import torch
        >>> from dtune import comm
        >>> state = comm.CommState(comm.PowerSGD(rank=1, min_compression_rate=0))
        >>> g = [torch.outer(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0, 1.0]))]
        >>> state.all_reduce(g)  # a rank-1 matrix is recovered exactly
        >>> [round(v, 4) for v in g[0].flatten().tolist()]
        [3.0, 0.0, 1.0, 6.0, 0.0, 2.0]
    """

    rank: int = 1
    warm_start: bool = True
    min_compression_rate: float = 2.0
    eps: float = 1e-8
    collective: ClassVar[Collective] = Collective.ALL_REDUCE

    def __post_init__(self) -> None:
        check_int("rank", self.rank, 1)
        if not isinstance(self.warm_start, bool):
            raise TypeError(f"`warm_start` must be a bool, got {type(self.warm_start).__name__}.")
        for name in ("min_compression_rate", "eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"`{name}` must be a number, got {type(value).__name__}.")
            if value < 0:
                raise ValueError(f"The value of `{name}` is {value!r}, but must be >= 0.")

    @property
    def error_feedback(self) -> bool:
        return True

    def compressed(self, shape: torch.Size) -> bool:
        """Whether a tensor of ``shape`` is sent as low-rank factors."""
        if len(shape) < 2:
            return False
        n = shape[0]
        m = shape.numel() // n
        return (n + m) * self.rank * self.min_compression_rate < n * m

    def init_bucket(self, bucket: BucketState) -> None:
        bucket.data["q"] = [None for _ in bucket.shapes]

    def _q(self, bucket: BucketState, position: int, n: int, m: int) -> torch.Tensor:
        q: torch.Tensor | None = bucket.data["q"][position]
        if q is None or not self.warm_start:
            # beyond min(n, m) the extra columns would orthonormalize round-off noise
            q = torch.randn(m, min(self.rank, n, m), generator=bucket.shared_generator)
            orthonormalize(q, self.eps)
        return q

    def _layout(self, bucket: BucketState) -> tuple[list[int], list[int]]:
        low_rank = [i for i, s in enumerate(bucket.shapes) if self.compressed(torch.Size(s))]
        return low_rank, [i for i in range(len(bucket.shapes)) if i not in low_rank]

    # compress/decompress are this rank's PowerSGD alone (P, Q of its own gradient, then P Q^T);
    # across ranks the two products are all-reduced in turn, which is what exchange does.
    def compress(self, tensor: torch.Tensor, bucket: BucketState) -> Payload:
        views = bucket.views(tensor)
        low_rank, plain = self._layout(bucket)
        parts = []
        for i in low_rank:
            matrix = views[i].view(views[i].shape[0], -1)
            p = matrix @ self._q(bucket, i, *matrix.shape)
            orthonormalize(p, self.eps)
            parts += [p.reshape(-1), (matrix.t() @ p).reshape(-1)]
        return Payload(torch.cat(parts + [views[i].reshape(-1) for i in plain]))

    def decompress(self, payload: Payload, bucket: BucketState, out: torch.Tensor) -> torch.Tensor:
        views = bucket.views(out)
        low_rank, plain = self._layout(bucket)
        offset = 0
        for i in low_rank:
            n = views[i].shape[0]
            m = views[i].numel() // n
            r = min(self.rank, n, m)
            p = payload.tensor[offset : offset + n * r].view(n, r)
            q = payload.tensor[offset + n * r : offset + (n + m) * r].view(m, r)
            offset += (n + m) * r
            torch.mm(p, q.t(), out=views[i].view(n, m))
        for i in plain:
            views[i].view(-1).copy_(payload.tensor[offset : offset + views[i].numel()])
            offset += views[i].numel()
        return out

    def exchange(
        self, tensor: torch.Tensor, bucket: BucketState, comm: Communicator, memory: Memory
    ) -> torch.futures.Future[torch.Tensor]:
        with comm.accounting.timed():
            # the compensated bucket belongs to the memory (unless there is none): it becomes the
            # residual in place; results go to the views of ``tensor``
            compensated = memory.compensate(tensor, bucket)
            keep = memory.keeps_residual
            views, outs = bucket.views(compensated), bucket.views(tensor)
            low_rank, plain = self._layout(bucket)
            matrices = {i: views[i].view(views[i].shape[0], -1) for i in low_rank}
            ps = {i: matrices[i] @ self._q(bucket, i, *matrices[i].shape) for i in low_rank}
            first = torch.cat([ps[i].reshape(-1) for i in low_rank] + [views[i].reshape(-1) for i in plain])
        comm.all_reduce(first, bucket).wait()  # issued and waited here: round two depends on it
        with comm.accounting.timed():
            offset = 0
            for i in low_rank:
                ps[i] = first[offset : offset + ps[i].numel()].view_as(ps[i])
                offset += ps[i].numel()
            for i in plain:  # sent exactly: the result, and nothing held back
                outs[i].view(-1).copy_(first[offset : offset + views[i].numel()])
                offset += views[i].numel()
                if keep:
                    views[i].zero_()
            for i in low_rank:
                orthonormalize(ps[i], self.eps)
            qs = {i: matrices[i].t() @ ps[i] for i in low_rank}
            second = torch.cat([qs[i].reshape(-1) for i in low_rank]) if low_rank else torch.empty(0)

        def finish(summed: torch.Tensor) -> torch.Tensor:
            with comm.accounting.timed():
                offset = 0
                for i in low_rank:
                    q = summed[offset : offset + qs[i].numel()].view_as(qs[i])
                    offset += qs[i].numel()
                    if keep:
                        # the paper's e_w = Delta_w - P Q^T, with Delta_w and P Q^T (the mean over
                        # ranks) both in units of the pre-divided bucket: this rank's share is 1/W
                        matrices[i].addmm_(ps[i], q.t(), alpha=-1 / bucket.world_size)
                    torch.mm(ps[i], q.t(), out=outs[i].view_as(matrices[i]))
                    bucket.data["q"][i] = q.clone()
                if keep:
                    memory.update(compensated, bucket)
                return tensor

        if not low_rank:
            return _done_future(finish(second))
        future: torch.futures.Future[torch.Tensor] = comm.all_reduce(second, bucket).then(
            lambda fut: finish(fut.value())
        )
        return future


def _done_future(value: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(value)
    return fut
