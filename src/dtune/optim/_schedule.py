"""Knobs that vary over training, and the milestone schedule that sets them.

A K-FAC knob (damping, update intervals, ...) is a number or a function of the K-FAC step
(the number of completed :meth:`KFAC.step` calls). :class:`Milestones` is such a function:
``base * factor ** k`` where ``k`` counts the milestones already passed. It is a pure function
of the step, so calling it any number of times never compounds. (The public kfac-pytorch
``LambdaParamScheduler`` multiplies the current value by the lambda at every call, so a
per-epoch call of an "alpha ** milestones passed" lambda compounds every epoch after the first
milestone; SC20's own ``KFACParamScheduler`` set ``base x factor`` as done here.)

Example:
    >>> from dtune.optim import Milestones
    >>> damping = Milestones(base=0.1, factor=0.5, milestones=(100, 200))
    >>> [damping(step) for step in (0, 99, 100, 150, 200, 10_000)]
    [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Knob", "Milestones", "resolve"]

Knob = float | Callable[[int], float]
"""A constant, or a function of the K-FAC step returning the value to use at that step."""


@dataclass(frozen=True, kw_only=True)
class Milestones:
    """``base * factor ** (number of milestones <= step)``: a step schedule for any knob.

    ``milestones`` are K-FAC steps (for epoch milestones use :meth:`from_epochs`). Update
    intervals are rounded to the nearest integer by :class:`KFAC`, so
    ``Milestones(base=10, factor=10, milestones=(500,))`` as ``inv_update_steps`` gives 10
    and then 100 (SC20's decoupled update schedule).

    Example:
        >>> from dtune.optim import Milestones
        >>> Milestones.from_epochs(base=10, factor=10, epochs=(2,), steps_per_epoch=50)(100)
        100.0
    """

    base: float
    factor: float
    milestones: Sequence[int] = ()

    def __post_init__(self) -> None:
        for key in ("base", "factor"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"`{key}` must be a number, got {type(value).__name__}.")
            if not math.isfinite(value):
                raise ValueError(f"The value of `{key}` is {value!r}, but must be finite.")
        if not self.factor > 0:
            raise ValueError(f"The value of `factor` is {self.factor!r}, but must be > 0.")
        steps = tuple(self.milestones)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps):
            raise ValueError(f"The value of `milestones` is {steps!r}, but must be integers >= 0.")
        if list(steps) != sorted(steps):
            raise ValueError(f"The value of `milestones` is {steps!r}, but must be in increasing order.")
        object.__setattr__(self, "milestones", steps)

    @classmethod
    def from_epochs(
        cls, *, base: float, factor: float, epochs: Sequence[int], steps_per_epoch: int
    ) -> Milestones:
        """The same schedule with milestones given in epochs of ``steps_per_epoch`` K-FAC steps."""
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise ValueError(f"The value of `steps_per_epoch` is {steps_per_epoch!r}, but must be >= 1.")
        return cls(base=base, factor=factor, milestones=tuple(e * steps_per_epoch for e in epochs))

    def __call__(self, step: int) -> float:
        return float(self.base * self.factor ** bisect.bisect_right(self.milestones, step))


def resolve(knob: Knob, step: int) -> float:
    """The value of ``knob`` at K-FAC step ``step``."""
    return float(knob(step) if callable(knob) else knob)
