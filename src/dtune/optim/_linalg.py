"""Guarded decompositions of Kronecker factors, and the preconditioning products.

``torch.linalg.eigh`` can fail to converge on ill-conditioned factors (a known failure of
K-FAC implementations, e.g. in ACKTR), and a factor can hold non-finite values after a
diverging step. Both are survived here: the factor is symmetrised and decomposed in fp32; on
failure a diagonal jitter growing x10 per retry is added; if every try fails, ``None`` tells
the caller to keep its last good decomposition.
"""

from __future__ import annotations

import torch

__all__ = ["guarded_eigh", "guarded_inverse", "precondition_eigen", "precondition_inverse"]


def _jitter_scale(matrix: torch.Tensor) -> float:
    scale = float(matrix.diagonal().abs().mean())
    return scale if scale > 0 else 1.0


def _symmetrized(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(fp32 symmetric part of matrix, identity)``, or None if the matrix is not finite."""
    work = matrix.detach().to(torch.float32)
    if not bool(torch.isfinite(work).all()):
        return None
    work = (work + work.t()) / 2
    return work, torch.eye(work.shape[0], dtype=work.dtype, device=work.device)


def guarded_eigh(
    matrix: torch.Tensor, *, jitter: float, retries: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(eigenvalues clamped to >= 0, eigenvectors)`` of a symmetric factor, or None on failure."""
    prepared = _symmetrized(matrix)
    if prepared is None:
        return None
    work, eye = prepared
    for attempt in range(retries + 1):
        shifted = work if attempt == 0 else work + (jitter * 10 ** (attempt - 1) * _jitter_scale(work)) * eye
        try:
            values, vectors = torch.linalg.eigh(shifted)
        except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
            continue
        if bool(torch.isfinite(values).all()) and bool(torch.isfinite(vectors).all()):
            return values.clamp_(min=0.0), vectors
    return None


def guarded_inverse(
    matrix: torch.Tensor, *, damping: float, jitter: float, retries: int
) -> torch.Tensor | None:
    """``(matrix + damping I)^-1`` of a symmetric PSD factor via Cholesky, or None on failure."""
    prepared = _symmetrized(matrix)
    if prepared is None:
        return None
    work, eye = prepared
    for attempt in range(retries + 1):
        shift = damping + (0.0 if attempt == 0 else jitter * 10 ** (attempt - 1) * _jitter_scale(work))
        try:
            factor = torch.linalg.cholesky(work + shift * eye)
        except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
            continue
        inverse = torch.cholesky_inverse(factor)
        if bool(torch.isfinite(inverse).all()):
            return inverse
    return None


def precondition_eigen(
    grad: torch.Tensor, qa: torch.Tensor, qg: torch.Tensor, inverse_eigen_products: torch.Tensor
) -> torch.Tensor:
    """``QG ((QG^T grad QA) / (dG dA^T + damping)) QA^T`` = ``(G (x) A + damping I)^-1 vec(grad)``.

    ``inverse_eigen_products`` is ``1 / (outer(dG, dA) + damping)``, cached by the caller.
    """
    rotated = torch.linalg.multi_dot([qg.t(), grad, qa])
    rotated.mul_(inverse_eigen_products)
    result: torch.Tensor = torch.linalg.multi_dot([qg, rotated, qa.t()])
    return result


def precondition_inverse(
    grad: torch.Tensor, a_inverse: torch.Tensor, g_inverse: torch.Tensor
) -> torch.Tensor:
    """``(G + damping I)^-1 grad (A + damping I)^-1``."""
    result: torch.Tensor = torch.linalg.multi_dot([g_inverse, grad, a_inverse])
    return result
