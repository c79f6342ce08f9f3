"""Generated tasks for benchmarks: harder than sklearn's digits, no downloads, fully seeded.

``TeacherTask`` is teacher-student classification: inputs ``x ~ N(0, I_d)`` labelled by the
argmax of a fixed random two-layer tanh network (the "teacher"). A student MLP learns it from a
stream of fresh batches, so there is no overfitting and accuracy measures how far optimization
got: methods that slow optimization down (lossy gradient compression) show it as accuracy at
a given step, which the digits MLP (97% for every method within 400 steps) could not.

Batches are a pure function of (task seed, step, rank), so every method sees the same data and
runs repeat exactly.

    >>> task = TeacherTask(seed=0)
    >>> x, y = task.batch(step=0, rank=0, size=4)
    >>> tuple(x.shape), int(y.max()) < task.classes
    ((4, 64), True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["TeacherTask", "mlp"]


@dataclass(frozen=True, kw_only=True)
class TeacherTask:
    """Teacher-student classification with ``classes`` classes in ``dim`` dimensions."""

    seed: int = 0
    dim: int = 64
    classes: int = 10
    teacher_width: int = 256
    sharpness: float = 4.0  # scales the teacher's hidden pre-activations: more = more non-linear
    _teacher: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        generator = torch.Generator().manual_seed(10_000 + self.seed)
        w1 = torch.randn(self.dim, self.teacher_width, generator=generator) * self.sharpness / self.dim**0.5
        b1 = torch.randn(self.teacher_width, generator=generator) * 0.5
        w2 = torch.randn(self.teacher_width, self.classes, generator=generator) / self.teacher_width**0.5
        object.__setattr__(self, "_teacher", (w1, b1, w2))

    def label(self, x: torch.Tensor) -> torch.Tensor:
        w1, b1, w2 = self._teacher
        return (torch.tanh(x @ w1 + b1) @ w2).argmax(1)

    def batch(self, *, step: int, rank: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's training batch at ``step`` (fresh samples every time)."""
        generator = torch.Generator().manual_seed(((self.seed * 1_000_003 + step) * 1_009 + rank) * 2 + 1)
        x = torch.randn(size, self.dim, generator=generator)
        return x, self.label(x)

    def test_set(self, size: int, part: int = 0, parts: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Part ``part`` of ``parts`` of a fixed held-out set of ``size`` samples."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 * 2)  # even: never a train seed
        x = torch.randn(size, self.dim, generator=generator)
        x = x.chunk(parts)[part]
        return x, self.label(x)


def mlp(inputs: int, widths: list[int], outputs: int, seed: int) -> nn.Module:
    """A ReLU MLP; 64-1024-1024-512-10 has 1,646,090 parameters (6.58 MB of fp32 gradients)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = inputs
    for hidden in widths:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)
