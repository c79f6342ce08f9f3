"""``train.prepare``: the door from an ordinary PyTorch loop to dtune's strategies."""

from __future__ import annotations

from typing import Any

from dtune.runtime import distributed
from dtune.train._allreduce import AllReduce
from dtune.train.strategy import Strategy

__all__ = ["prepare", "unwrap"]


def prepare(
    model: Any, optimizer: Any, strategy: Strategy | None = None, *, preconditioner: Any = None
) -> tuple[Any, Any]:
    """Hand ``model`` and ``optimizer`` to ``strategy`` (default :class:`AllReduce`).

    Returns the model to train (it may be wrapped, e.g. in DDP: use :func:`unwrap` to save its
    weights) and the same optimizer, now calling the strategy before and after every step.
    With one worker and no process group this changes nothing but the hooks. A
    ``preconditioner`` (e.g. ``dtune.optim.KFAC``) runs before every step, after the strategy
    has synchronised the gradients.

    Example:
        >>> import torch
        >>> from dtune import train
        >>> model = torch.nn.Linear(4, 2)
        >>> model, opt = train.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    """
    strategy = AllReduce() if strategy is None else strategy
    if not isinstance(strategy, Strategy):
        raise TypeError(f"`strategy` must be a dtune.train.Strategy, got {type(strategy).__name__}.")
    if preconditioner is not None and not callable(getattr(preconditioner, "attach", None)):
        raise TypeError(
            "`preconditioner` must provide attach(optimizer) (e.g. dtune.optim.KFAC), "
            f"got {type(preconditioner).__name__}."
        )
    wrapped_model, wrapped_optimizer = strategy.wrap(model, optimizer)
    wrapped_optimizer.register_step_pre_hook(lambda opt, args, kwargs: strategy.before_step(opt))
    if preconditioner is not None:  # pre-hooks run in order: gradients are synchronised first
        preconditioner.attach(wrapped_optimizer)
        wrapped_model._dtune_preconditioner = preconditioner
    wrapped_optimizer.register_step_post_hook(lambda opt, args, kwargs: strategy.after_step(opt))
    distributed.on_group_exit(strategy.close)
    wrapped_model._dtune_strategy = strategy
    return wrapped_model, wrapped_optimizer


def unwrap(model: Any) -> Any:
    """The user's own module inside whatever :func:`prepare` wrapped it in."""
    return getattr(model, "module", model)


def strategy_of(model: Any) -> Strategy:
    """The strategy a prepared model trains with (for its ``state_dict`` in checkpoints)."""
    strategy = getattr(model, "_dtune_strategy", None)
    if not isinstance(strategy, Strategy):
        raise ValueError("This model was not returned by dtune.train.prepare().")
    return strategy
