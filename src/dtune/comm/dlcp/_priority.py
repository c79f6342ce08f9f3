"""Packet priority: a class per packet from its layer's position and its gradient magnitude.

DLCP (Wang et al., "Domain-specific Communication Optimization for Distributed DNN Training")
observes that gradients differ in importance by layer and by magnitude, so packets can be
prioritised and the least important dropped first. Papers and notes disagree on the direction
of the layer rule (front layers are needed first by the next forward pass; back layers were
also reported as more important), so it is a setting here (:class:`LayerRule`) and the
benchmark measures both directions.

Class 0 is *protected*: a bounded-loss step never completes without every protected packet.
Classes 1..C-1 are ordered by a score that mixes the magnitude rank and the layer rank. A packet
whose values were dropped at the last steps is promoted one class per consecutive drop
(``age``), so with error feedback no coordinate starves: after C-1 drops in a row it is
protected. With deterministic drops every rank drops the same packets, and without promotion
those coordinates would never update.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import torch

from dtune.comm._base import check_enum

__all__ = ["DSCP_OF_CLASS", "LayerRule", "PriorityPolicy", "layer_positions"]

# DSCP code points per class (EF, AF41, AF31, AF21, AF11, CS1, CS1, CS1); the TOS byte is dscp << 2
DSCP_OF_CLASS = (46, 34, 26, 18, 10, 8, 8, 8)


class LayerRule(enum.Enum):
    """Which layers' packets the layer rule ranks as more important."""

    FRONT_FIRST = "front_first"
    """Input-side layers first (needed first by the next forward pass)."""
    BACK_FIRST = "back_first"
    """Output-side layers first."""
    NONE = "none"
    """Magnitude alone."""


def _number(name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}.")
    if not low <= value <= high:
        raise ValueError(f"The value of `{name}` is {value!r}, but must be in [{low}, {high}].")


def _rank01(score: np.ndarray) -> np.ndarray:
    """Each entry's rank in ``score`` scaled to [0, 1] (ties broken by position, stably)."""
    n = score.size
    if n == 1:
        return np.ones(1)
    ranks = np.empty(n)
    ranks[np.argsort(score, kind="stable")] = np.arange(n)
    return ranks / (n - 1)


@dataclass(frozen=True, kw_only=True)
class PriorityPolicy:
    """How packets are classed: ``protected`` fraction by magnitude, then a layer/magnitude score.

    ``classes`` counts the protected class 0; ``layer_weight`` is the weight of the layer rank
    against the magnitude rank in the score of classes 1..C-1. ``PriorityPolicy(classes=2,
    protected=0)`` puts every packet in class 1: no priority at all (the "bound only" ablation).

    Example:
        >>> import numpy as np, torch
        >>> from dtune.comm.dlcp import LayerRule, PriorityPolicy
        >>> policy = PriorityPolicy(classes=3, protected=0.25, layer_rule=LayerRule.NONE)
        >>> values = torch.tensor([[1.0], [0.1], [5.0], [0.2]])
        >>> policy.classify(values, np.ones(4), np.zeros(4)).tolist()
        [1, 2, 0, 2]
    """

    classes: int = 4
    protected: float = 0.05
    layer_rule: LayerRule = LayerRule.FRONT_FIRST
    layer_weight: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.classes, bool) or not isinstance(self.classes, int):
            raise TypeError(f"`classes` must be an integer, got {type(self.classes).__name__}.")
        if not 2 <= self.classes <= len(DSCP_OF_CLASS):
            raise ValueError(f"The value of `classes` is {self.classes!r}, but must be in [2, 8].")
        _number("protected", self.protected, 0.0, 1.0)
        check_enum("layer_rule", self.layer_rule, LayerRule)
        _number("layer_weight", self.layer_weight, 0.0, 1.0)

    def classify(
        self,
        values: torch.Tensor,
        lengths: np.ndarray,
        layer_position: np.ndarray,
        age: np.ndarray | None = None,
    ) -> np.ndarray:
        """Classes (uint8) of packets with payloads ``values`` (n, per packet), vectorised.

        ``lengths`` are the valid values per packet, ``layer_position`` in [0, 1] (0 = input
        side), ``age`` the consecutive drops of each packet's values so far (promotion).
        """
        n = values.shape[0]
        magnitude = (values.float().abs().sum(1).numpy() / np.maximum(lengths, 1)).astype(np.float64)
        by_magnitude = _rank01(magnitude)
        if self.layer_rule is LayerRule.NONE or self.layer_weight == 0:
            score = by_magnitude
        else:
            front = 1.0 - np.asarray(layer_position, dtype=np.float64)
            layer = front if self.layer_rule is LayerRule.FRONT_FIRST else 1.0 - front
            score = (1 - self.layer_weight) * by_magnitude + self.layer_weight * layer
        classes = np.empty(n, dtype=np.int64)
        n_protected = round(self.protected * n)
        order = np.argsort(-magnitude, kind="stable")
        protected = np.zeros(n, dtype=bool)
        protected[order[:n_protected]] = True
        # classes 1..C-1 in equal-sized groups of the score, most important first
        rest = np.flatnonzero(~protected)
        if rest.size:
            rank = _rank01(score[rest])  # 1 = most important
            classes[rest] = 1 + np.minimum(
                ((1.0 - rank) * (self.classes - 1)).astype(np.int64), self.classes - 2
            )
        classes[protected] = 0
        if age is not None:
            classes = np.maximum(classes - age.astype(np.int64), 0)
        return classes.astype(np.uint8)


def layer_positions(
    boundaries: np.ndarray, layer_ids: np.ndarray, layers: int, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(layer id, position in [0, 1]) of the packets starting at element ``offsets``.

    ``boundaries`` are the end offsets of the payload's tensors (cumulative sizes), ``layer_ids``
    each tensor's index in model order, ``layers`` how many tensors the model has.
    """
    tensor = np.minimum(np.searchsorted(boundaries, offsets, side="right"), len(layer_ids) - 1)
    ids = layer_ids[tensor]
    return ids, ids / max(layers - 1, 1)
