"""Quality metrics for click-through-rate models: normalised entropy and ROC AUC.

Normalised entropy (He et al., "Practical Lessons from Predicting Clicks on Ads at Facebook",
ADKDD 2014) is the average log loss divided by the entropy of the background click rate: 1.0
is no better than always predicting the base rate, lower is better, and unlike raw log loss it
compares across data sets with different base rates. AUC measures ranking only.
"""

from __future__ import annotations

import math

import torch

__all__ = ["auc", "normalized_entropy"]

_EPS = 1e-7


def _check(predictions: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    predictions = predictions.detach().reshape(-1).double()
    labels = labels.detach().reshape(-1).double()
    if predictions.numel() != labels.numel() or predictions.numel() == 0:
        raise ValueError(
            f"`predictions` and `labels` must be non-empty and of one size, got "
            f"{predictions.numel()} and {labels.numel()}."
        )
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("The values of `labels` must be 0 or 1.")
    return predictions, labels


def normalized_entropy(
    probabilities: torch.Tensor, labels: torch.Tensor, *, base_rate: float | None = None
) -> float:
    """Mean log loss of ``probabilities`` over the entropy of ``base_rate`` (default: mean label).

    Example:
        >>> import torch
        >>> from dtune.data import normalized_entropy
        >>> labels = torch.tensor([0.0, 0.0, 0.0, 1.0])
        >>> round(normalized_entropy(torch.full((4,), 0.25), labels), 6)  # the base rate itself
        1.0
    """
    p, y = _check(probabilities, labels)
    rate = float(y.mean()) if base_rate is None else base_rate
    if not 0 < rate < 1:
        raise ValueError(f"The value of `base_rate` is {rate}, but must be in (0, 1) (both classes needed).")
    p = p.clamp(_EPS, 1 - _EPS)
    log_loss = -float((y * p.log() + (1 - y) * (1 - p).log()).mean())
    entropy = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    return log_loss / entropy


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U; tied scores count one half).

    Example:
        >>> import torch
        >>> from dtune.data import auc
        >>> auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        0.75
    """
    s, y = _check(scores, labels)
    positives = float(y.sum())
    negatives = y.numel() - positives
    if positives == 0 or negatives == 0:
        raise ValueError("`labels` must hold both classes for the AUC to be defined.")
    _, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2  # ranks 1..N, ties share their mean rank
    rank_sum = float(mean_rank[inverse][y == 1].sum())
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
