"""Second-order preconditioning for distributed training: K-FAC (Pauloski et al., SC20).

``KFAC(model, ...)`` rewrites the gradients of Linear and Conv2d layers between
``loss.backward()`` and ``optimizer.step()`` (by hand with ``kfac.step()``, or as an optimizer
step pre-hook with ``kfac.attach(optimizer)``), so any optimizer works on top. In a worker
group it averages factors across workers and spreads the decompositions over them; see
:class:`KFAC`, :class:`KFACConfig`, :class:`Assignment` and :class:`Milestones`.

Example:
    >>> import torch
    >>> from dtune import train
    >>> from dtune.optim import KFAC, Milestones
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> kfac = KFAC(model, damping=0.1, factor_update_steps=10,
    ...             inv_update_steps=Milestones(base=100, factor=0.5, milestones=(1000,)))
    >>> model, optimizer = train.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> handle = kfac.attach(optimizer)  # kfac.step() now runs inside optimizer.step()
"""

from dtune.optim._assignment import WorkPlan, grad_workers_for, plan_work
from dtune.optim._config import Assignment, KFACConfig, Method
from dtune.optim._kfac import KFAC
from dtune.optim._schedule import Knob, Milestones

__all__ = [
    "KFAC",
    "Assignment",
    "KFACConfig",
    "Knob",
    "Method",
    "Milestones",
    "WorkPlan",
    "grad_workers_for",
    "plan_work",
]
