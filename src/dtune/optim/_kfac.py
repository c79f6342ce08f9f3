"""Distributed K-FAC preconditioner (Pauloski et al., SC20; Martens & Grosse, 2015).

Pauloski, Zhang, Huang, Xu, Foster: "Convolutional Neural Network Training with Distributed
K-FAC", SC20 (arXiv:2007.00784), with the KAISA grid of SC21 (arXiv:2107.01739); K-FAC from
Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate Curvature",
ICML 2015; convolutions from Grosse & Martens, "A Kronecker-factored approximate Fisher matrix
for convolution layers", ICML 2016.

:class:`KFAC` is a preconditioner, not an optimizer: it rewrites the gradients of the Linear
and Conv2d layers between ``loss.backward()`` and the user's ``optimizer.step()``, so any
optimizer (momentum, weight decay, schedules) works on top. The SC20 ingredients:

- factors averaged across workers, in flat buckets, at factor-update steps only;
- decompositions spread over workers by a greedy n^3 cost model (:mod:`._assignment`), the
  results broadcast (COMM_OPT) or the preconditioned gradients broadcast (MEM_OPT), or a mix;
- inverse-free preconditioning with eigendecompositions (``Method.EIGEN``);
- factor and decomposition updates decoupled from every step (``factor_update_steps``,
  ``inv_update_steps``, each also a function of the step, e.g. :class:`Milestones`).

Gradients must be the same on all workers when MEM_OPT or HYBRID is used (``train.AllReduce``
or DDP average them during backward); COMM_OPT preconditions whatever each worker holds.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from typing import Any

import torch
from torch import nn

from dtune.optim._assignment import WorkPlan, grad_workers_for, plan_work
from dtune.optim._config import KFACConfig, check_value
from dtune.optim._exchange import Exchange
from dtune.optim._layers import KFACLayer, unsupported_reason
from dtune.optim._schedule import resolve
from dtune.runtime import distributed

__all__ = ["KFAC"]

_log = logging.getLogger(__name__)


class KFAC:
    """Kronecker-factored preconditioner for the Linear and Conv2d layers of ``model``.

    Pass a :class:`KFACConfig` or its fields as keywords. Construct it after the process group
    exists (``train.launch`` and ``dtune.run`` workers have one) and before or after
    ``train.prepare``; call :meth:`step` after ``backward()`` and before ``optimizer.step()``,
    or let :meth:`attach` do it. Other modules with parameters are left to the optimizer,
    with one notice.

    The factors are those of the per-example Fisher, assuming the loss is averaged over the
    batch (PyTorch's default): ``damping`` is relative to the Fisher's own scale. kfac-pytorch's
    factors are smaller (by the batch size squared for ``G``, and by the output area squared for
    both convolution factors), so its damping values do not carry over. A loss divided by ``k``
    for gradient accumulation makes ``G`` ``k^2`` times smaller; scale ``damping`` to match.

    Example:
        >>> import torch
        >>> from dtune.optim import KFAC
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> kfac = KFAC(model, damping=0.01, factor_update_steps=1, inv_update_steps=10, lr=0.1)
        >>> x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
        >>> torch.nn.functional.cross_entropy(model(x), y).backward()
        >>> kfac.step()  # preconditions the gradients in place
        >>> optimizer.step()
    """

    def __init__(self, model: nn.Module, config: KFACConfig | None = None, /, **options: Any) -> None:
        if config is not None and options:
            raise TypeError("Pass either a KFACConfig or keyword options to KFAC, not both.")
        if config is not None and not isinstance(config, KFACConfig):
            raise TypeError(f"`config` must be a dtune.optim.KFACConfig, got {type(config).__name__}.")
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        self.config = config if config is not None else KFACConfig(**options)
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module  # the same modules, named as in the user's model
        self.layers = _register(model, self.config.skip_layers)
        self.steps = 0
        self._rank = distributed.rank()
        workers = grad_workers_for(
            self.config.assignment, self.config.grad_worker_fraction, distributed.world_size()
        )
        self.plan: WorkPlan = plan_work(
            [layer.cost for layer in self.layers], world_size=distributed.world_size(), grad_workers=workers
        )
        self._exchange = Exchange(self.plan, self._rank)
        self._optimizer: Any = None
        self._capturing = True
        self._stale = False
        self._warned_unused = False
        self._handles = [
            layer.module.register_forward_hook(functools.partial(self._forward_hook, layer))
            for layer in self.layers
        ]

    # -- hooks -----------------------------------------------------------------------------

    def _forward_hook(self, layer: KFACLayer, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not (self._capturing and module.training and torch.is_grad_enabled()):
            return
        if not args or not isinstance(args[0], torch.Tensor):
            return
        x = args[0]
        batched = x.dim() == 4 if layer.is_conv else x.dim() > 1
        batch_size = x.shape[0] if batched else 1
        limit = self.config.factor_examples
        used = limit if batched and limit is not None and batch_size > limit else None
        # Statistics are taken now, before a later in-place op (ReLU(inplace=True)) can change
        # the input, and the output's gradient through a tensor hook, which sees the gradient of
        # the value before any in-place change; module full-backward hooks fail on both counts.
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            layer.capture_input(x if used is None else x[:used])
        if isinstance(output, torch.Tensor) and output.requires_grad:
            hook = functools.partial(self._grad_hook, layer, batch_size, used)
            output.register_hook(hook)  # type: ignore[no-untyped-call]

    @staticmethod
    def _grad_hook(layer: KFACLayer, batch_size: int, used: int | None, grad: torch.Tensor) -> None:
        with torch.no_grad(), torch.autocast(grad.device.type, enabled=False):
            layer.capture_output_grad(grad if used is None else grad[:used], batch_size)

    # -- the step ----------------------------------------------------------------------------

    def _value(self, name: str, step: int) -> float:
        knob = getattr(self.config, name)
        value = resolve(knob, step)
        return check_value(name, value, step) if callable(knob) else value

    def _interval(self, name: str, step: int) -> int:
        return max(1, round(self._value(name, step)))

    @torch.no_grad()
    def step(self) -> None:
        """Precondition the current gradients in place (and update factors/decompositions when due)."""
        step = self.steps
        if self._capturing:
            self._update_factors(self._value("factor_decay", step))
        damping = self._value("damping", step)
        if step % self._interval("inv_update_steps", step) == 0 or self._stale:
            self._update_decompositions(damping)
            self._stale = False
        self._precondition(step, damping)
        self.steps += 1
        self._capturing = self.steps % self._interval("factor_update_steps", self.steps) == 0

    def _update_factors(self, decay: float) -> None:
        self._exchange.reduce_statistics(self.layers, self.config.bucket_mb)
        for layer in self.layers:
            layer.fold(decay)
        unused = [layer.name for layer in self.layers if layer.updates == 0]
        if unused and not self._warned_unused:
            self._warned_unused = True
            _log.warning(
                "K-FAC: %d layer(s) saw no training forward/backward before step %d and stay "
                "unpreconditioned until they do: %s", len(unused), self.steps, ", ".join(unused),
            )  # fmt: skip

    def _update_decompositions(self, damping: float) -> None:
        config = self.config
        for index, layer in enumerate(self.layers):
            if self.plan.inverse_workers[index] == self._rank:
                layer.decompose(config.method, damping=damping, jitter=config.eigh_jitter,
                                retries=config.eigh_retries)  # fmt: skip
        for layer in self.layers:
            layer.ready = layer.ready or layer.A is not None  # the same on every worker
        self._exchange.share_decompositions(self.layers, config.method)

    def _precondition(self, step: int, damping: float) -> None:
        grads: dict[int, torch.Tensor] = {}
        preconditioned: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(self.layers):
            grad = layer.grad_matrix() if layer.ready else None
            if grad is None:
                continue
            grads[index] = grad
            if self.plan.is_grad_worker(index, self._rank):
                preconditioned[index] = layer.precondition(grad, self.config.method, damping)
        self._exchange.share_gradients(grads, preconditioned)
        scale = self._kl_scale(step, grads, preconditioned)
        for index, matrix in preconditioned.items():
            if scale != 1.0:
                matrix.mul_(scale)
            self.layers[index].set_grad(matrix)

    def _kl_scale(
        self, step: int, grads: dict[int, torch.Tensor], preconditioned: dict[int, torch.Tensor]
    ) -> float:
        """``min(1, sqrt(kl_clip / |sum_layers v . g| lr^2))``, SC20's KL-clip."""
        if self.config.kl_clip is None or not preconditioned:
            return 1.0
        kl_clip = self._value("kl_clip", step)
        lr = self._learning_rate(step)
        products = torch.stack(
            [torch.dot(v.reshape(-1), grads[i].reshape(-1)) for i, v in preconditioned.items()]
        )
        vg = abs(float(products.sum())) * lr**2
        if vg == 0.0 or not math.isfinite(vg):
            return 1.0
        return min(1.0, math.sqrt(kl_clip / vg))

    def _learning_rate(self, step: int) -> float:
        if self.config.lr is not None:
            return self._value("lr", step)
        if self._optimizer is None:
            raise ValueError(
                "KL-clip needs the learning rate: pass `lr=` (a number or a function of the step), "
                "call kfac.attach(optimizer), or set kl_clip=None."
            )
        return float(self._optimizer.param_groups[0]["lr"])

    # -- integration -----------------------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Run :meth:`step` before every ``optimizer.step()`` (a step pre-hook), and take KL-clip's
        learning rate from ``optimizer.param_groups[0]`` unless ``lr`` was given.

        Returns the hook's handle (``handle.remove()`` detaches). ``train.prepare`` calls this
        after the strategy's own pre-hook, so gradients are synchronised first.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        self._optimizer = optimizer
        return optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.step())

    def remove(self) -> None:
        """Remove the forward hooks from the model (the preconditioner stops collecting)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def state_dict(self) -> dict[str, Any]:
        """The step count and every layer's running factors (decompositions are recomputed)."""
        return {
            "steps": self.steps,
            "layers": {
                layer.name: {"A": _clone(layer.A), "G": _clone(layer.G), "updates": layer.updates}
                for layer in self.layers
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; decompositions are recomputed at the next step.

        Every worker must load the same state (the factors are identical across workers).
        """
        saved = state.get("layers", {})
        known = {layer.name: layer for layer in self.layers}
        if set(saved) != set(known):
            raise ValueError(
                f"The K-FAC state has layers {sorted(saved)}, but this model has {sorted(known)}."
            )
        for name, entry in saved.items():
            layer = known[name]
            for key, size in (("A", layer.a_dim), ("G", layer.g_dim)):
                value = entry[key]
                if value is not None and tuple(value.shape) != (size, size):
                    raise ValueError(f"The saved factor {key} of layer {name!r} has shape "
                                     f"{tuple(value.shape)}, but must be {(size, size)}.")  # fmt: skip
                setattr(
                    layer,
                    key,
                    None if value is None else value.detach().to(layer.device, torch.float32).clone(),
                )
            layer.updates = int(entry["updates"])
            layer.reset_statistics()
        self.steps = int(state["steps"])
        self._capturing = self.steps % self._interval("factor_update_steps", self.steps) == 0
        self._stale = True


def _clone(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().clone()


def _register(model: nn.Module, skip_layers: tuple[str, ...] | Any) -> list[KFACLayer]:
    """The preconditioned layers of ``model``, with one notice for the modules left out."""
    patterns = [re.compile(p) for p in skip_layers]
    layers: list[KFACLayer] = []
    left_out: list[str] = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if any(p.fullmatch(name) or p.fullmatch(kind) for p in patterns):
            continue
        if isinstance(module, nn.Linear | nn.Conv2d):
            reason = unsupported_reason(module)
            if reason is None:
                layers.append(KFACLayer(name, module))
                continue
            left_out.append(f"{name} ({kind}: {reason})")
        elif any(True for _ in module.parameters(recurse=False)):
            left_out.append(f"{name} ({kind})")
    if left_out:
        _log.warning(
            "K-FAC preconditions Linear and Conv2d layers only; left to the optimizer as they are: %s",
            ", ".join(left_out),
        )
    if not layers:
        _log.warning("K-FAC found no Linear or Conv2d layer to precondition; step() will change nothing.")
    return layers
