"""The Strategy contract: how a worker group keeps its model replicas in sync.

A strategy wraps the user's model and optimizer for an ordinary PyTorch loop
(``loss.backward(); optimizer.step()``) and acts at documented hook points:

- ``wrap``: once, at ``train.prepare``; may return a wrapped model (e.g. DDP);
- after backward: through autograd hooks it registers itself (gradient all-reduce, compression);
- ``before_step`` / ``after_step``: around every ``optimizer.step()`` (optimizer step hooks);
- background: threads it starts in ``wrap`` and stops in ``close`` (ShadowSync).

It owns its process groups, threads and state; ``state_dict``/``load_state_dict`` cover all of
the distributed state so PBT and resume work.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Strategy"]


class Strategy:
    """Base class: every hook is a no-op, so a strategy overrides only what it needs."""

    def wrap(self, model: Any, optimizer: Any) -> tuple[Any, Any]:
        """Take over ``model`` and ``optimizer``; return what the loop should use."""
        return model, optimizer

    def before_step(self, optimizer: Any) -> None:
        """Called before every ``optimizer.step()``, gradients computed."""

    def after_step(self, optimizer: Any) -> None:
        """Called after every ``optimizer.step()``."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def close(self) -> None:
        """Stop threads and release groups (called when the worker leaves its group)."""
