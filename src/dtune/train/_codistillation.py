"""Codistillation: n models trained side by side, sharing knowledge through a distillation loss.

Sodhani, Delalleau, Assran, Sinha, Ballas, Rabbat, "A Closer Look at Codistillation for
Distributed Training" (arXiv 2010.02838); Anil, Pereyra, Passos, Ormandi, Dahl, Hinton, "Large
scale distributed neural network training through online distillation" (ICLR 2018).

Model ``i`` of ``n`` minimises ``L(y, f_i(x)) + alpha * 1/(n-1) * sum_{j != i} D(f_i(x), f_j'(x))``
where ``f_j'`` is a stale replica of peer ``j`` evaluated (in eval mode, without gradients) on
model ``i``'s own batch. Parameters are exchanged, not predictions, and only every ``period``
steps, so communication falls by about the period compared with all-reduce; the price is
``n - 1`` extra forward passes per step.

Topology: the W workers split into ``n`` model groups of ``W/n`` consecutive ranks, each trained
with ordinary all-reduce (DDP over the group). Worker ``l`` of every model group joins exchange
group ``l`` (one worker per model), a dedicated process group on which snapshots are
all-gathered, so the exchange never interleaves with the model group's gradient all-reduce.

Timeline, deterministic so that runs and resumes are reproducible:

- at the end of burn-in (at ``prepare`` without burn-in) a blocking exchange, so distillation
  starts from current replicas;
- after step ``k = burn_in_steps + m * period``: parameters and buffers are packed into one byte
  buffer and an asynchronous all-gather into a *back* buffer starts; training goes on;
- the snapshot becomes visible ``delay_steps`` steps later (default 1: the next step): it is
  waited for if still in flight and copied whole into the *front* buffer between two steps.
  Replicas are views into the front buffer, so no forward pass sees a half-written replica.
"""

from __future__ import annotations

import copy
import enum
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dtune.runtime import distributed
from dtune.train._replicas import ReplicaExchange
from dtune.train._schedules import check_int
from dtune.train.strategy import Strategy

if TYPE_CHECKING:
    import torch

__all__ = ["Codistillation", "DistillLoss"]

_EXCHANGE_COUNTERS = ("exchanges", "bytes_sent", "bytes_received")
_COUNTERS = (
    "allreduce_bytes",
    "extra_forward_passes",
    "extra_forward_samples",
    "extra_forward_s",
    "distill_calls",
    "steps_without_distillation",
)


class DistillLoss(enum.Enum):
    """How far model ``i``'s outputs are from a peer's: ``D(own, peer)``, differentiated in ``own``."""

    KL = "kl"  # KL(softmax(peer) || softmax(own)), mean over the batch (Zhang et al. DML; Anil et al.)
    MSE = "mse"  # mean squared error between logits (Anil et al.)

    def __call__(self, own: torch.Tensor, peer: torch.Tensor) -> torch.Tensor:
        from torch.nn import functional

        if self is DistillLoss.KL:
            own_log, peer_log = functional.log_softmax(own, -1), functional.log_softmax(peer, -1)
            return functional.kl_div(own_log, peer_log, reduction="batchmean", log_target=True)
        return functional.mse_loss(own, peer)


class Codistillation(Strategy):
    """Train ``models`` models at once; each distils from stale replicas of the others.

    Add the distillation term through :meth:`loss` and backpropagate what it returns; a step
    after burn-in that did not (no call, or another loss backpropagated) warns, once per kind of
    mistake, since the model would silently train alone. Pair it with
    :class:`~dtune.train.CodistillationRecipe` (weight decay lowered at the learning-rate decays,
    milestones shifted later), without which codistillation over-regularises.

    - ``alpha``: weight of the term, a constant or ``step -> alpha``; ``period``: steps between
      exchanges; ``distill_loss``: :class:`DistillLoss` ``KL`` or ``MSE``; ``burn_in_steps``:
      steps without the term (and without exchanges); ``models``: how many models (must divide
      the workers; ``model_index`` says which one this worker trains, e.g. to seed it);
      ``delay_steps``: how many steps a snapshot may stay in flight (1 <= delay <= period);
      ``bucket_mb``: DDP buckets inside a model group.
    - :meth:`metrics` counts bytes exchanged and all-reduced and the extra forward passes.

    :meth:`state_dict` is collective (call it on every rank at the same step, as with
    ``dtune.report``): it gathers every model's weights and optimizer state, the replicas'
    snapshot and any in-flight one, so rank 0's checkpoint restores every model group.
    :meth:`load_state_dict` restores this worker's own model, optimizer and replicas from it.

    Example:
        >>> import torch
        >>> from dtune import train
        >>> strategy = train.Codistillation(alpha=1.0, period=50, models=2)
        >>> # model, optimizer = train.prepare(model, optimizer, strategy=strategy)
        >>> # for x, y in train.shard(batches):
        >>> #     outputs = model(x)
        >>> #     loss = strategy.loss(torch.nn.functional.cross_entropy(outputs, y), outputs, x)
        >>> #     optimizer.zero_grad(); loss.backward(); optimizer.step()
    """

    def __init__(
        self,
        *,
        alpha: float | Callable[[int], float] = 1.0,
        period: int = 50,
        distill_loss: DistillLoss = DistillLoss.KL,
        burn_in_steps: int = 0,
        models: int = 2,
        delay_steps: int = 1,
        bucket_mb: float = 25.0,
    ) -> None:
        if not callable(alpha) and not (isinstance(alpha, int | float) and alpha >= 0):
            raise ValueError(f"The value of `alpha` is {alpha!r}, but must be >= 0 or a callable.")
        check_int("period", period, 1)
        check_int("burn_in_steps", burn_in_steps, 0)
        check_int("models", models, 1)
        check_int("delay_steps", delay_steps, 1)
        if delay_steps > period:
            raise ValueError(
                f"The value of `delay_steps` is {delay_steps}, but must be <= `period` {period}."
            )
        if not isinstance(distill_loss, DistillLoss):
            raise TypeError(f"`distill_loss` must be a DistillLoss (KL or MSE), got {distill_loss!r}.")
        if not bucket_mb > 0:
            raise ValueError(f"The value of `bucket_mb` is {bucket_mb!r}, but must be > 0.")
        self.alpha, self.period, self.distill_loss = alpha, period, distill_loss
        self.burn_in_steps, self.models, self.delay_steps = burn_in_steps, models, delay_steps
        self.bucket_mb = bucket_mb
        self.steps = 0
        self.counters: dict[str, float] = dict.fromkeys(_COUNTERS, 0)
        self.last_distillation: torch.Tensor | None = None
        self._module: Any = None
        self._optimizer: Any = None
        self._exchange: ReplicaExchange | None = None
        self._groups: list[Any] = []
        self._exchange_group: Any = None
        self._distilled = False  # strategy.loss was called during this step
        self._term_computed = False  # ... and computed a distillation term
        self._term_backpropagated = False  # ... which reached backward
        self._warned: set[str] = set()

    # topology -----------------------------------------------------------------------------------
    @property
    def group_size(self) -> int:
        """Workers per model (each model group trains with all-reduce inside)."""
        world = distributed.world_size()
        if world % self.models:
            raise ValueError(f"The value of `models` is {self.models}, but must divide the {world} workers.")
        return world // self.models

    @property
    def model_index(self) -> int:
        """Which of the ``models`` this worker trains (e.g. to seed its initialisation)."""
        return distributed.rank() // self.group_size

    @property
    def replicas(self) -> list[Any]:
        """The peers' replicas (eval mode, no gradients), in model order without this model."""
        return [] if self._exchange is None else list(self._exchange.replicas)

    @property
    def snapshot_step(self) -> int:
        """The step at which the weights the replicas hold now were taken."""
        return 0 if self._exchange is None else self._exchange.snapshot_step

    def wrap(self, model: Any, optimizer: Any) -> tuple[Any, Any]:
        if self._module is not None:
            raise RuntimeError(
                "This Codistillation already trains a model: create one strategy per prepare()."
            )
        size, n = self.group_size, self.models
        self._module, self._optimizer = model, optimizer
        model_group = None  # the default group when one model spans every worker
        if n > 1 and size > 1:
            model_group = distributed.new_subgroups([[m * size + i for i in range(size)] for m in range(n)])
        if n > 1:  # dedicated, even when it spans every worker: async gathers never meet user collectives
            self._exchange_group = distributed.new_subgroups(
                [[m * size + i for m in range(n)] for i in range(size)]
            )
        self._groups = [model_group, self._exchange_group]
        wrapped = model
        if size > 1:
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model, process_group=model_group, bucket_cap_mb=self.bucket_mb)
            # a lambda: DDP refuses hooks whose (here postponed, string) annotations are not its types
            wrapped.register_comm_hook(
                model_group, lambda group, bucket: self._counting_allreduce(group, bucket)
            )
        if n > 1:
            self._exchange = ReplicaExchange(
                model, models=n, index=self.model_index, group=self._exchange_group
            )
            if self.burn_in_steps == 0:
                self._exchange.start(0, blocking=True)
        return wrapped, optimizer

    def _counting_allreduce(self, group: Any, bucket: Any) -> Any:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self.counters["allreduce_bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
        return allreduce_hook(group, bucket)

    # the distillation term ----------------------------------------------------------------------
    def _alpha(self) -> float:
        value = float(self.alpha(self.steps)) if callable(self.alpha) else float(self.alpha)
        if not value >= 0:
            raise ValueError(f"The value of `alpha` at step {self.steps} is {value!r}, but must be >= 0.")
        return value

    def loss(
        self, task_loss: torch.Tensor, outputs: torch.Tensor, *inputs: Any, **kwargs: Any
    ) -> torch.Tensor:
        """``task_loss + alpha * 1/(n-1) * sum_j D(outputs, replica_j(*inputs, **kwargs))``.

        ``outputs`` must be this model's outputs on exactly ``inputs`` (the replicas are run on
        them); ``task_loss`` is returned unchanged during burn-in, with one model, or when
        alpha is 0. The unweighted term is kept in ``last_distillation`` for logging.
        """
        import torch

        if self._module is None:
            raise RuntimeError("Pass this strategy to train.prepare(model, optimizer, strategy=...) first.")
        if not isinstance(task_loss, torch.Tensor) or task_loss.dim() != 0:
            raise ValueError("`task_loss` must be a scalar tensor (the loss before distillation).")
        if torch.is_grad_enabled():
            if not outputs.requires_grad:
                raise ValueError("`outputs` do not require grad: pass the model's own outputs, not detached.")
            self._distilled = True
            self.counters["distill_calls"] += 1
        exchange = self._exchange
        if exchange is None or self.steps < self.burn_in_steps:
            return task_loss
        alpha = self._alpha()
        if alpha == 0:
            return task_loss
        pending = exchange.pending_step()
        if pending is not None and self.steps >= pending + self.delay_steps - 1:
            exchange.make_visible()  # due: the snapshot taken after step `pending` is `delay_steps` old
        start = time.perf_counter()
        with torch.no_grad():
            peers = [replica(*inputs, **kwargs) for replica in exchange.replicas]
        self.counters["extra_forward_s"] += time.perf_counter() - start
        for peer in peers:
            if peer.shape != outputs.shape:
                raise ValueError(
                    f"A replica's outputs on `inputs` have shape {tuple(peer.shape)}, but `outputs` have "
                    f"{tuple(outputs.shape)}: pass the model's outputs on exactly these inputs."
                )
        term = torch.stack([self.distill_loss(outputs, peer) for peer in peers]).mean()
        if term.requires_grad:  # to tell, before the step, whether the term was backpropagated
            self._term_computed = True
            term.register_hook(self._on_backward)  # type: ignore[no-untyped-call]
        self.counters["extra_forward_passes"] += len(peers)
        self.counters["extra_forward_samples"] += len(peers) * (outputs.shape[0] if outputs.dim() else 1)
        self.last_distillation = term.detach()
        return task_loss + alpha * term

    # step hooks ---------------------------------------------------------------------------------
    def _on_backward(self, grad: torch.Tensor) -> None:
        self._term_backpropagated = True

    def before_step(self, optimizer: Any) -> None:
        if self._exchange is None or self.steps < self.burn_in_steps:
            return
        if not self._distilled:
            problem = "ran without strategy.loss(...)"
        elif self._term_computed and not self._term_backpropagated:
            problem = "backpropagated a loss other than the one strategy.loss(...) returned"
        else:
            return
        self.counters["steps_without_distillation"] += 1
        if problem not in self._warned:  # once per kind of mistake
            self._warned.add(problem)
            warnings.warn(
                f"Codistillation: optimizer step {self.steps} {problem}, so this model trains alone. "
                "Use `loss = strategy.loss(task_loss, outputs, inputs)`, then `loss.backward()`.",
                UserWarning,
                stacklevel=2,
            )

    def after_step(self, optimizer: Any) -> None:
        self._distilled = self._term_computed = self._term_backpropagated = False
        self.steps += 1
        if self._exchange is None or self.steps < self.burn_in_steps:
            return
        if self.steps == self.burn_in_steps:  # distillation starts now: from current replicas
            self._exchange.start(self.steps, blocking=True)
        elif (self.steps - self.burn_in_steps) % self.period == 0:
            self._exchange.start(self.steps, blocking=False)

    def metrics(self) -> dict[str, float]:
        """Communication and compute counters of this worker, ready for ``dtune.report``.

        Bytes are payloads this worker handed to collectives: snapshots sent and received, and
        gradient buckets all-reduced inside its model group. ``extra_forward_*`` are the replica
        forward passes; ``staleness`` is how many steps old the visible replicas are.
        """
        counters = {**self.counters, **({} if self._exchange is None else self._exchange.counters)}
        result = {
            f"codistill_{key}": float(counters.get(key, 0)) for key in (*_EXCHANGE_COUNTERS, *_COUNTERS)
        }
        result["codistill_staleness"] = float(self.steps - self.snapshot_step)
        if self.last_distillation is not None:
            result["codistill_distillation"] = float(self.last_distillation)
        return result

    # state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything to resume every model group; collective: call it on every rank."""
        if self._module is None:
            raise RuntimeError("Pass this strategy to train.prepare(...) before saving its state.")
        own = {"model": self._module.state_dict(), "optimizer": self._optimizer.state_dict()}
        if self._exchange is None:
            per_model = [copy.deepcopy(own)]
        else:
            per_model = distributed.all_gather_object(own, self._exchange_group)  # in model order
        return {
            "models": self.models,
            "world_size": distributed.world_size(),
            "steps": self.steps,
            "counters": dict(self.counters),
            "warned": sorted(self._warned),
            "replicas": None if self._exchange is None else self._exchange.state_dict(),
            "per_model": per_model,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore this worker's model, optimizer, replicas and counters from any rank's state."""
        if self._module is None:
            raise RuntimeError("Pass this strategy to train.prepare(...) before loading its state.")
        world = distributed.world_size()
        if state["models"] != self.models or state["world_size"] != world:
            raise ValueError(
                f"The state holds {state['models']} models on {state['world_size']} workers, but this "
                f"strategy trains {self.models} models on {world} workers."
            )
        own = state["per_model"][self.model_index]
        self._module.load_state_dict(own["model"])
        self._optimizer.load_state_dict(own["optimizer"])
        self.steps = int(state["steps"])
        self.counters = {key: state["counters"].get(key, 0) for key in _COUNTERS}
        self._warned = set(state["warned"])
        if self._exchange is not None:
            self._exchange.load_state_dict(state["replicas"])

    def close(self) -> None:
        if self._exchange is not None:
            self._exchange.close()
        for group in self._groups:
            distributed.destroy_subgroup(group)
        self._groups, self._exchange_group = [], None
