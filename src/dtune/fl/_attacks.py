"""Attack models: Byzantine updates, poisoned labels, and strategic forecast inflation.

``Attack`` describes what ``per_round`` of a round's valid participants do (the adversary controls
that many of the updates the server receives, the setting robust aggregators are built for):

- ``SIGN_FLIP``: send ``-scale * update`` (push the model backwards);
- ``SCALING``: send ``scale * update`` (a boosted update that dominates a mean);
- ``NOISE``: send Gaussian noise with standard deviation ``scale`` per coordinate;
- ``LABEL_FLIP``: train honestly on flipped labels ``C - 1 - y`` (data poisoning).

Strategic liars are a different threat: they are honest in training but inflate the forecasts
they send, to be selected more often (Prophet trusts client-side forecasts). ``inflate_forecasts``
is what such a client sends instead of its own forecast.

Reference: Blanchard et al., NeurIPS 2017 and Fang et al., "Local Model Poisoning Attacks to
Byzantine-Robust Federated Learning", USENIX Security 2020 (update attacks); Tolpegin et al.,
"Data Poisoning Attacks Against Federated Learning Systems", ESORICS 2020 (label flipping).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from dtune.fl._forecast import Estimates

__all__ = ["Attack", "AttackKind", "inflate_forecasts"]


class AttackKind(enum.Enum):
    """What an attacking client does to its update."""

    SIGN_FLIP = "sign_flip"
    SCALING = "scaling"
    NOISE = "noise"
    LABEL_FLIP = "label_flip"


_DEFAULT_SCALE = {
    AttackKind.SIGN_FLIP: 4.0,
    AttackKind.SCALING: 20.0,
    AttackKind.NOISE: 1.0,
    AttackKind.LABEL_FLIP: 1.0,
}


@dataclass(frozen=True, kw_only=True)
class Attack:
    """``per_round`` of each round's valid participants attack with ``kind``.

    Args:
        kind: the attack.
        per_round: attackers among each round's valid participants (fewer if fewer are valid).
        scale: strength (see the module docstring); ``None`` picks 4 for sign flip, 20 for
            scaling and 1 for noise.

    Example:
        >>> attack = Attack(kind=AttackKind.SIGN_FLIP, per_round=2)
        >>> attack.corrupt(np.ones((3, 2)), np.array([True, False, False]), np.random.default_rng(0))[0]
        array([-4., -4.])
    """

    kind: AttackKind
    per_round: int = 2
    scale: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, AttackKind):
            raise TypeError(f"The value of `kind` is {self.kind!r}, but must be a dtune.fl.AttackKind.")
        if isinstance(self.per_round, bool) or not isinstance(self.per_round, int) or self.per_round < 0:
            raise ValueError(f"The value of `per_round` is {self.per_round!r}, but must be an integer >= 0.")
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"The value of `scale` is {self.scale!r}, but must be > 0.")

    @property
    def strength(self) -> float:
        return _DEFAULT_SCALE[self.kind] if self.scale is None else float(self.scale)

    def choose(self, valid: int, rng: np.random.Generator) -> np.ndarray:
        """A mask over ``valid`` participants marking this round's attackers."""
        mask = np.zeros(valid, dtype=bool)
        mask[rng.choice(valid, size=min(self.per_round, valid), replace=False)] = True
        return mask

    def corrupt(self, updates: np.ndarray, attackers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The updates the server receives: attackers' rows replaced, the others untouched."""
        out = np.array(updates, dtype=np.float64, copy=True)
        if not attackers.any():
            return out
        if self.kind is AttackKind.SIGN_FLIP:
            out[attackers] *= -self.strength
        elif self.kind is AttackKind.SCALING:
            out[attackers] *= self.strength
        elif self.kind is AttackKind.NOISE:
            out[attackers] = self.strength * rng.standard_normal((int(attackers.sum()), out.shape[1]))
        return out  # LABEL_FLIP poisons training (see VectorModel.local_train), not the update


def inflate_forecasts(
    estimates: Estimates, liars: np.ndarray, deadline_s: float, factor: float = 0.25
) -> Estimates:
    """What strategic liars send: a round finished within ``factor`` of the deadline, for sure.

    Each phase is claimed to take at most ``factor * deadline_s / 2`` and availability is claimed
    certain; a liar whose own forecast is better than the lie sends its own.
    """
    if not 0 < factor <= 1:
        raise ValueError(f"The value of `factor` is {factor!r}, but must be in (0, 1].")
    claim = factor * deadline_s / 2
    train = np.where(liars, np.minimum(estimates.train_s, claim), estimates.train_s)
    report = np.where(liars, np.minimum(estimates.report_s, claim), estimates.report_s)
    p_available = np.where(liars, 1.0, estimates.p_available)
    return Estimates(train_s=train, report_s=report, p_available=p_available)
