"""K-FAC configuration: one keyword-only dataclass, options as Enums, validated at construction.

Knobs that may vary over training (intervals, damping, decay, KL-clip, lr) accept a number or
a function of the K-FAC step (see :class:`~dtune.optim.Milestones`); numbers are checked here,
functions each time they are evaluated, with the same message.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dtune.optim._schedule import Knob

__all__ = ["Assignment", "KFACConfig", "Method", "check_value"]


class Method(enum.Enum):
    """How a layer's Kronecker factors are turned into a preconditioner."""

    EIGEN = "eigen"
    """Eigendecompositions ``A = QA diag(dA) QA^T``, ``G = QG diag(dG) QG^T``; damping is added
    to the eigenvalue products, i.e. ``(G (x) A + damping I)^-1`` is applied exactly (SC20's
    inverse-free evaluation)."""
    INVERSE = "inverse"
    """Explicit inverses ``(G + damping I)^-1 grad (A + damping I)^-1`` (Martens & Grosse)."""


class Assignment(enum.Enum):
    """Who keeps a layer's second-order results (Pauloski et al., SC20 and KAISA, SC21).

    Each layer's decomposition is computed by one worker chosen by a greedy n^3 cost model;
    its *gradient workers* precondition the layer's gradient and every other worker receives
    the preconditioned gradient from one of them.
    """

    COMM_OPT = "comm-opt"
    """Every worker is a gradient worker: decompositions are broadcast to all workers at
    inverse-update steps; no gradient traffic. Most memory, least communication."""
    MEM_OPT = "mem-opt"
    """Only the computing worker keeps a layer's decomposition and broadcasts the
    preconditioned gradient every step. Least memory, most communication."""
    HYBRID = "hybrid"
    """``grad_worker_fraction`` of the workers are gradient workers of each layer."""


_Rule = tuple[Callable[[float], bool], str]
_POSITIVE: _Rule = (lambda v: v > 0, "> 0")
_AT_LEAST_ONE: _Rule = (lambda v: v >= 1, ">= 1")
_RULES: dict[str, _Rule] = {
    "factor_update_steps": _AT_LEAST_ONE,
    "inv_update_steps": _AT_LEAST_ONE,
    "damping": _POSITIVE,
    "factor_decay": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "kl_clip": _POSITIVE,
    "lr": _POSITIVE,
    "grad_worker_fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "bucket_mb": _POSITIVE,
    "eigh_jitter": _POSITIVE,
}


def check_value(name: str, value: Any, step: int | None = None) -> float:
    """``value`` as a float if it satisfies ``name``'s rule, else ValueError/TypeError."""
    where = "" if step is None else f" at step {step}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"The value of `{name}`{where} must be a number, got {type(value).__name__}.")
    ok, text = _RULES[name]
    if not (math.isfinite(value) and ok(value)):
        raise ValueError(f"The value of `{name}`{where} is {value!r}, but must be {text}.")
    return float(value)


@dataclass(frozen=True, kw_only=True)
class KFACConfig:
    """Every option of :class:`~dtune.optim.KFAC` (the constructor takes the same keywords).

    Example:
        >>> from dtune.optim import KFACConfig, Method
        >>> KFACConfig(damping=0.01, inv_update_steps=50, method=Method.INVERSE).inv_update_steps
        50
    """

    factor_update_steps: Knob = 1
    """Update the factors A and G every this many steps (SC20's decoupled updates)."""
    inv_update_steps: Knob = 10
    """Recompute the decompositions every this many steps."""
    damping: Knob = 0.01
    """Tikhonov damping of each Fisher block (see :class:`Method` for where it is added)."""
    factor_decay: Knob = 0.95
    """Running-average weight of the old factor (the first updates are plain means)."""
    kl_clip: Knob | None = 0.001
    """Scale all preconditioned gradients by ``min(1, sqrt(kl_clip / |sum v.g| lr^2))``; None: off."""
    lr: Knob | None = None
    """Learning rate for KL-clip; None: the attached optimizer's current ``param_groups[0]['lr']``."""
    method: Method = Method.EIGEN
    assignment: Assignment = Assignment.COMM_OPT
    grad_worker_fraction: float = 0.5
    """With ``Assignment.HYBRID``: the fraction of workers that are gradient workers of a layer."""
    skip_layers: Sequence[str] = field(default_factory=tuple)
    """Regular expressions; a module whose name or class name fully matches one is not preconditioned."""
    factor_examples: int | None = None
    """Take factor statistics from at most the first this many examples of each batch (None: all).
    Factors are estimated well from a few hundred examples, so a large batch need not pay for
    statistics over all of them; with shuffled batches the first ones are a random subset."""
    bucket_mb: float = 25.0
    """Size of the flat buffers in which factors are all-reduced."""
    eigh_jitter: float = 1e-6
    """Relative diagonal jitter added when a decomposition fails to converge (x10 per retry)."""
    eigh_retries: int = 3

    def __post_init__(self) -> None:
        for name in ("factor_update_steps", "inv_update_steps", "damping", "factor_decay", "kl_clip", "lr"):
            value = getattr(self, name)
            if (value is None and name in ("kl_clip", "lr")) or callable(value):
                continue
            check_value(name, value)
        for name in ("grad_worker_fraction", "bucket_mb", "eigh_jitter"):
            check_value(name, getattr(self, name))
        for name, enum_type in (("method", Method), ("assignment", Assignment)):
            if not isinstance(getattr(self, name), enum_type):
                raise TypeError(
                    f"`{name}` must be a dtune.optim.{enum_type.__name__}, got {getattr(self, name)!r}."
                )
        for name, minimum in (("eigh_retries", 0), ("factor_examples", 1)):
            value = getattr(self, name)
            if value is None and name == "factor_examples":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"The value of `{name}` is {value!r}, but must be an integer >= {minimum}.")
        if isinstance(self.skip_layers, str) or not all(isinstance(p, str) for p in self.skip_layers):
            raise TypeError("`skip_layers` must be a sequence of regular expressions (strings).")
        for pattern in self.skip_layers:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(
                    f"The value of `skip_layers` holds {pattern!r}, which is not a valid regular "
                    f"expression: {error}."
                ) from None
        object.__setattr__(self, "skip_layers", tuple(self.skip_layers))
