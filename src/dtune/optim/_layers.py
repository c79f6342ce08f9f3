"""Linear and Conv2d layers as K-FAC sees them: factor statistics, decompositions, gradients.

A layer's Fisher block is approximated as ``A (x) G`` (Martens & Grosse, 2015), with ``A`` the
second moment of the layer's inputs (a ones column appended for a bias) and ``G`` that of the
per-example gradients with respect to its outputs. Convolutions use im2col patches and the
spatially-uncorrelated-derivatives approximation of Grosse & Martens (2016, "KFC"):
``A = E_n[sum_t a_t a_t^T]`` over the output positions ``t`` and ``G = E_n[mean_t g_t g_t^T]``.
A Linear layer applied to ``(N, T, d)`` inputs treats ``T`` the same way.

Per-example gradients are ``N`` times the gradients PyTorch computes for a loss averaged over
the batch (the default ``reduction="mean"``), so damping is relative to the Fisher itself.
Statistics are kept as sums with a weight (the number of examples), so that factors from
workers with different batch sizes, or from several forward passes per step, average exactly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dtune.optim._config import Method
from dtune.optim._linalg import guarded_eigh, guarded_inverse, precondition_eigen, precondition_inverse

__all__ = ["KFACLayer", "im2col", "unsupported_reason"]

_CHUNK_ELEMENTS = 2**18  # im2col patches per chunk: 1 MiB of float32


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a Linear or Conv2d module cannot be preconditioned, or None if it can."""
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return "grouped convolution"
    if not all(p.requires_grad for p in module.parameters(recurse=False)):
        return "frozen parameters"
    return None


def im2col(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """The patches a Conv2d multiplies its weight with, as a ``(C*kh*kw, N*Ho*Wo)`` matrix.

    Built from strided views of the padded input and a single copy whose innermost runs are
    image rows, which is several times faster on CPU than ``F.unfold`` followed by a transpose.
    Rows are ordered like ``conv.weight.view(out_channels, -1)``.
    """
    pad = conv._reversed_padding_repeated_twice
    if any(pad):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pad, mode=mode)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    patches = x.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)  # N C Ho Wo KH KW
    if dh > 1 or dw > 1:
        patches = patches[..., ::dh, ::dw]
    return patches.permute(1, 4, 5, 0, 2, 3).reshape(x.shape[1] * kh * kw, -1)


class KFACLayer:
    """One registered Linear or Conv2d module and everything K-FAC keeps for it."""

    def __init__(self, name: str, module: nn.Linear | nn.Conv2d) -> None:
        self.name = name
        self.module = module
        self.is_conv = isinstance(module, nn.Conv2d)
        self.has_bias = module.bias is not None
        self.in_dim = module.weight[0].numel()
        self.a_dim = self.in_dim + int(self.has_bias)
        self.g_dim = module.weight.shape[0]
        self.a_sum: torch.Tensor | None = None  # statistics since the last factor update
        self.g_sum: torch.Tensor | None = None
        self.a_weight = 0.0
        self.g_weight = 0.0
        self.A: torch.Tensor | None = None  # running factors
        self.G: torch.Tensor | None = None
        self.updates = 0
        self.decomposition: dict[str, torch.Tensor] = {}  # qa, da, qg, dg | a_inv, g_inv
        self.version = 0  # bumped whenever the decomposition changes
        self.ready = False  # a decomposition exists on this layer's gradient workers
        self.failures = 0
        self._products: torch.Tensor | None = None
        self._products_key: tuple[int, float] | None = None

    @property
    def cost(self) -> int:
        """Work of one decomposition (n^3 per factor), used to balance workers."""
        return self.a_dim**3 + self.g_dim**3

    @property
    def device(self) -> torch.device:
        return self.module.weight.device

    # -- statistics, captured in the hooks -------------------------------------------------

    def _buffers(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.a_sum is None or self.g_sum is None:
            self.a_sum = torch.zeros(self.a_dim, self.a_dim, device=device)
            self.g_sum = torch.zeros(self.g_dim, self.g_dim, device=device)
        return self.a_sum, self.g_sum

    def capture_input(self, x: torch.Tensor) -> None:
        """Add the second moment of the inputs of the examples in ``x`` to ``a_sum``."""
        x = x.detach().to(torch.float32)
        if self.is_conv:
            x = x if x.dim() == 4 else x.unsqueeze(0)
            # patches of a few examples at a time stay in cache (several times faster for big batches)
            per_chunk = max(1, _CHUNK_ELEMENTS // max(1, self.in_dim * x[0, 0].numel()))
            for part in torch.split(x, per_chunk):
                self._add_input_moment(im2col(part, self.module))  # type: ignore[arg-type]
            self.a_weight += x.shape[0]
        else:
            self._add_input_moment(x.reshape(-1, self.in_dim).t())
            self.a_weight += x.shape[0] if x.dim() > 1 else 1

    def _add_input_moment(self, cols: torch.Tensor) -> None:
        """``a_sum += [cols; 1] [cols; 1]^T`` for a ``(in_dim, rows)`` matrix, without the ones row."""
        a_sum, _ = self._buffers(cols.device)
        d = self.in_dim
        if not self.has_bias:
            a_sum.addmm_(cols, cols.t())
            return
        a_sum[:d, :d].addmm_(cols, cols.t())
        sums = cols.sum(1)
        a_sum[:d, d] += sums
        a_sum[d, :d] += sums
        a_sum[d, d] += cols.shape[1]

    def capture_output_grad(self, grad: torch.Tensor, batch_size: int) -> None:
        """Add the second moment of per-example output gradients (mean over positions) to ``g_sum``.

        ``grad`` holds the output gradients of the examples captured by :meth:`capture_input`,
        of a loss averaged over ``batch_size`` examples: a per-example gradient is
        ``batch_size * grad``.
        """
        _, g_sum = self._buffers(grad.device)
        grad = grad.detach().to(torch.float32)
        if self.is_conv:
            grad = grad if grad.dim() == 4 else grad.unsqueeze(0)
            examples = grad.shape[0]
            rows = grad.transpose(0, 1).reshape(self.g_dim, -1)
        else:
            examples = grad.shape[0] if grad.dim() > 1 else 1
            rows = grad.reshape(-1, self.g_dim).t()
        positions = rows.shape[1] / examples
        g_sum.addmm_(rows, rows.t(), alpha=batch_size**2 / positions)
        self.g_weight += examples

    def statistics(self) -> list[torch.Tensor]:
        """The sums to all-reduce (zeros if this worker saw nothing)."""
        return list(self._buffers(self.device))

    def fold(self, decay: float) -> bool:
        """Fold the statistics into the running factors; False if there were none."""
        if self.a_sum is None or self.g_sum is None or self.a_weight <= 0 or self.g_weight <= 0:
            self.reset_statistics()
            return False
        self.updates += 1
        alpha = min(decay, 1.0 - 1.0 / self.updates)  # plain mean of the first updates
        for key, total, weight in (("A", self.a_sum, self.a_weight), ("G", self.g_sum, self.g_weight)):
            factor = getattr(self, key)
            if factor is None or alpha == 0.0:
                setattr(self, key, total / weight)
            else:
                factor.mul_(alpha).add_(total, alpha=(1.0 - alpha) / weight)
        self.reset_statistics()
        return True

    def reset_statistics(self) -> None:
        if self.a_sum is not None and self.g_sum is not None:
            self.a_sum.zero_()
            self.g_sum.zero_()
        self.a_weight = self.g_weight = 0.0

    # -- decompositions --------------------------------------------------------------------

    def decompose(self, method: Method, *, damping: float, jitter: float, retries: int) -> None:
        """Recompute the decomposition from the running factors, keeping the last good one on failure.

        A factor that cannot be decomposed at all before any success falls back to its diagonal.
        """
        if self.A is None or self.G is None:
            return
        for side, factor in (("a", self.A), ("g", self.G)):
            result = self._decompose_factor(side, factor, method, damping, jitter, retries)
            if result is not None:
                self.decomposition.update(result)
                continue
            self.failures += 1
            if (f"q{side}" if method is Method.EIGEN else f"{side}_inv") not in self.decomposition:
                diagonal = torch.nan_to_num(factor.diagonal().float(), nan=0.0, posinf=0.0).clamp(min=0.0)
                if method is Method.EIGEN:
                    eye = torch.eye(len(diagonal), device=diagonal.device)
                    self.decomposition.update({f"d{side}": diagonal, f"q{side}": eye})
                else:
                    self.decomposition[f"{side}_inv"] = torch.diag(1.0 / (diagonal + damping))
        self.version += 1

    @staticmethod
    def _decompose_factor(
        side: str, factor: torch.Tensor, method: Method, damping: float, jitter: float, retries: int
    ) -> dict[str, torch.Tensor] | None:
        if method is Method.EIGEN:
            result = guarded_eigh(factor, jitter=jitter, retries=retries)
            return None if result is None else {f"d{side}": result[0], f"q{side}": result[1]}
        inverse = guarded_inverse(factor, damping=damping, jitter=jitter, retries=retries)
        return None if inverse is None else {f"{side}_inv": inverse}

    def decomposition_buffers(self, method: Method) -> list[torch.Tensor]:
        """The decomposition tensors in a fixed order, allocated if this worker has none yet."""
        if method is Method.EIGEN:
            shapes = {"qa": (self.a_dim, self.a_dim), "da": (self.a_dim,), "qg": (self.g_dim, self.g_dim),
                      "dg": (self.g_dim,)}  # fmt: skip
        else:
            shapes = {"a_inv": (self.a_dim, self.a_dim), "g_inv": (self.g_dim, self.g_dim)}
        for key, shape in shapes.items():
            if key not in self.decomposition:
                self.decomposition[key] = torch.zeros(shape, device=self.device)
        return [self.decomposition[key] for key in shapes]

    # -- gradients ---------------------------------------------------------------------------

    def grad_matrix(self) -> torch.Tensor | None:
        """The gradient as an ``(out, in [+ 1])`` matrix, or None if the layer has none."""
        weight = self.module.weight.grad
        if weight is None:
            return None
        grad = weight.reshape(self.g_dim, -1).to(torch.float32)
        if self.has_bias:
            bias = self.module.bias.grad  # type: ignore[union-attr]
            bias = torch.zeros(self.g_dim, device=grad.device) if bias is None else bias.to(torch.float32)
            grad = torch.cat([grad, bias.view(-1, 1)], 1)
        return grad

    def precondition(self, grad: torch.Tensor, method: Method, damping: float) -> torch.Tensor:
        d = self.decomposition
        if method is Method.INVERSE:
            return precondition_inverse(grad, d["a_inv"], d["g_inv"])
        key = (self.version, damping)
        if self._products is None or self._products_key != key:
            self._products = torch.outer(d["dg"], d["da"]).add_(damping).reciprocal_()
            self._products_key = key
        return precondition_eigen(grad, d["qa"], d["qg"], self._products)

    def set_grad(self, matrix: torch.Tensor) -> None:
        """Write ``matrix`` (same layout as :meth:`grad_matrix`) into the parameters' gradients."""
        weight: Any = self.module.weight.grad
        weight.copy_(matrix[:, : self.in_dim].reshape(weight.shape))
        if self.has_bias and self.module.bias is not None and self.module.bias.grad is not None:
            self.module.bias.grad.copy_(matrix[:, self.in_dim])
