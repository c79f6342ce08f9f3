"""ShadowSync: synchronise dense replicas in a background thread; the training thread never waits.

Zheng et al., "ShadowSync: Performing Synchronization in the Background for Highly Scalable
Distributed Training", arXiv 2003.03477: each trainer runs one "shadow" thread that syncs its
dense replica with the other trainers over and over, as fast as the link allows, while training
goes on; sparse embedding tables are not replicated but live on embedding servers shared by
all trainers. The rules are EASGD (Zhang et al., NeurIPS 2015), model averaging and BMUF (Chen
& Huo, ICASSP 2016); see :mod:`dtune.train._sync_algorithms`. :class:`ForegroundSync` runs the
same rules every ``period`` steps inside ``optimizer.step()``, for comparison.

Design:

- **Roles.** With ``servers=S`` the last S ranks are servers (embedding tables and EASGD's
  centre, :mod:`dtune.train._servers`) and call :meth:`serve`; the others are trainers and call
  ``train.prepare``.
- **Own groups.** The shadow thread talks over private gloo groups (one among trainers, one to
  the servers), so its messages never interleave with the training thread's.
- **Delta apply.** A sync reads the replica (``x_sent``), exchanges it, and applies
  ``x += x_new - x_sent``: the steps taken while the sync was in flight are kept.
  ``apply=Apply.OVERWRITE`` sets ``x = x_new`` instead. Reads and writes are Hogwild-style,
  without a lock against the training thread (as in the paper).
- **Stopping.** MA and BMUF rounds pair the trainers' shadow threads; a stop flag rides in
  every round's all-reduce, so all threads leave after the same round. ``close`` stops and joins
  the thread, says goodbye to the servers and releases the groups.
- **Checkpoints.** The thread starts at the first step (a checkpoint loaded before training
  never races a sync). ``state_dict``/``load_state_dict`` run quiesced: they wait for the
  round in flight, hold the thread while they read or write, then let it go on from the
  restored state. They cover step and sync counters, BMUF's global model and block momentum,
  EASGD's centre and the embedding tables (fetched from / pushed to the servers), and are called
  from the training thread (they share its line to the servers). To save the model and the
  strategy of one moment (PBT, resume), read both inside one ``with strategy.quiesced():``.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dtune.runtime import distributed
from dtune.train._pacing import SlowdownPacer, pause_after
from dtune.train._servers import ServerLink, SparseTables, serve
from dtune.train._sync_algorithms import (
    Apply,
    DenseReplica,
    Rule,
    SyncAlgorithm,
    easgd_centre_update,
    make_rule,
)
from dtune.train.strategy import Strategy

__all__ = ["ForegroundSync", "ShadowSync", "SyncStats"]

_SERVER_TIMEOUT_S = 7 * 24 * 3600.0  # a server waits for requests as long as its trainers train
_RULES = (SyncAlgorithm.EASGD, SyncAlgorithm.MA, SyncAlgorithm.BMUF)


@dataclass(frozen=True)
class SyncStats:
    """How often a trainer synced: ``gap`` is in foreground steps between two completed syncs."""

    steps: int
    syncs: int
    elapsed_s: float
    syncs_per_s: float
    mean_gap_steps: float
    mean_sync_s: float
    mean_steps_during_sync: float
    duty_cycle: float = 1.0  # the fraction of time the shadow thread is currently allowed to sync


class _ReplicaSync(Strategy):
    _background = False

    def __init__(
        self,
        *,
        algorithm: SyncAlgorithm,
        servers: int,
        sparse_modules: Sequence[str] | None,
        sparse_lr: float | None,
        moving_rate: float | None,
        block_momentum: float | None,
        block_lr: float,
        nesterov: bool,
        dedicated_sync_server: bool,
    ) -> None:
        if not isinstance(algorithm, SyncAlgorithm):
            raise TypeError(f"`algorithm` must be a SyncAlgorithm, got {algorithm!r}.")
        if isinstance(servers, bool) or not isinstance(servers, int) or servers < 0:
            raise ValueError(f"The value of `servers` is {servers!r}, but must be an integer >= 0.")
        if sparse_lr is not None and not sparse_lr > 0:
            raise ValueError(f"The value of `sparse_lr` is {sparse_lr}, but must be > 0.")
        if moving_rate is not None and not 0 < moving_rate < 1:
            raise ValueError(f"The value of `moving_rate` is {moving_rate}, but must be in (0, 1).")
        if block_momentum is not None and not 0 <= block_momentum < 1:
            raise ValueError(f"The value of `block_momentum` is {block_momentum}, but must be in [0, 1).")
        if not block_lr > 0:
            raise ValueError(f"The value of `block_lr` is {block_lr}, but must be > 0.")
        if dedicated_sync_server and servers < 2:
            raise ValueError(
                f"The value of `servers` is {servers}, but must be >= 2 with a dedicated sync server "
                "(one for the tables, the last one for the centre)."
            )
        self.algorithm = algorithm
        self.servers = servers
        self.sparse_modules = None if sparse_modules is None else list(sparse_modules)
        self.sparse_lr = sparse_lr
        self.moving_rate = moving_rate
        self.block_momentum = block_momentum
        self.block_lr = block_lr
        self.nesterov = nesterov
        self.dedicated_sync_server = dedicated_sync_server
        self._steps = 0
        self._syncs = 0
        self._sync_s = 0.0
        self._steps_during = 0
        self._started: float | None = None
        self._closed = False
        self._groups: list[Any] = []
        self._links: list[ServerLink] = []
        self._rule: Rule | None = None
        self._sparse: SparseTables | None = None
        self._dense: DenseReplica | None = None
        self._local_centre: torch.Tensor | None = None
        self._params: list[nn.Parameter] = []

    # -- roles ------------------------------------------------------------------------------
    def _server_count(self) -> int:
        return self.servers if distributed.is_distributed() else 0  # one process: no servers

    @property
    def trainers(self) -> int:
        """How many ranks train (the group's size less the servers)."""
        return distributed.world_size() - self._server_count()

    @property
    def trainer_rank(self) -> int:
        """This trainer's index among the trainers (shard data by it)."""
        return distributed.rank()

    @property
    def is_server(self) -> bool:
        """True on the last ``servers`` ranks: they call :meth:`serve` instead of training."""
        return distributed.rank() >= self.trainers

    def _split(self, model: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[nn.Parameter]]:
        sparse: list[tuple[str, nn.Module]]
        if self.sparse_modules is None:
            sparse = [
                (n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag)
            ]
        else:
            found = dict(model.named_modules())
            missing = [n for n in self.sparse_modules if n not in found]
            if missing:
                raise ValueError(f"`sparse_modules` names {missing}, which the model does not have.")
            sparse = [(n, found[n]) for n in self.sparse_modules]
        tables = {id(m.weight) for _, m in sparse}
        return sparse, [p for p in model.parameters() if id(p) not in tables]

    def _setup(self, model: nn.Module) -> tuple[list[tuple[str, nn.Module]], DenseReplica]:
        """Checks, groups (same order on every rank), and the start from rank 0's dense state."""
        world, servers = distributed.world_size(), self._server_count()
        if servers >= world and distributed.is_distributed():
            raise ValueError(f"The value of `servers` is {servers}, but must be < the group size {world}.")
        sparse, self._params = self._split(model)
        dense = DenseReplica(self._params, list(model.buffers()))
        if servers == 0 and distributed.is_distributed():
            if sparse:
                raise ValueError(
                    f"The model has sparse modules {[n for n, _ in sparse]}, whose tables live on servers: "
                    "pass servers=1 (and launch one more worker), or sparse_modules=[] to replicate them."
                )
            if self.algorithm is SyncAlgorithm.EASGD:
                raise ValueError(
                    "EASGD keeps its centre on a sync server: pass servers=1 and launch one more worker."
                )
        trainers = list(range(world - servers))
        self._groups = [distributed.new_private_group(trainers)]
        if self._background:
            self._groups.append(distributed.new_private_group(trainers))
        for _ in range(2 if self._background else 1):
            if servers:
                self._groups.append(distributed.new_private_group(timeout_s=_SERVER_TIMEOUT_S))
        distributed.broadcast_tensors(dense.tensors)  # every replica (and the centre) starts alike
        self._dense = dense
        return sparse, dense

    def _defaults(self) -> tuple[float, float]:
        m = max(1, self.trainers)
        alpha = self.moving_rate if self.moving_rate is not None else min(0.9 / m, 0.9)
        eta = self.block_momentum if self.block_momentum is not None else 1.0 - 1.0 / m
        return alpha, eta

    # -- trainer side -----------------------------------------------------------------------
    def wrap(self, model: Any, optimizer: Any) -> tuple[Any, Any]:
        if self.is_server:
            raise RuntimeError(f"Rank {distributed.rank()} is a server of this strategy: call serve(model).")
        sparse, dense = self._setup(model)
        servers = list(range(self.trainers, distributed.world_size())) if self._server_count() else []
        ps_groups = self._groups[2 if self._background else 1 :]
        tables_on = servers[:-1] if self.dedicated_sync_server else servers
        self._links = [ServerLink(g, tables_on, servers[-1]) for g in ps_groups] if servers else []
        self._sparse = SparseTables(sparse, link=self._links[0] if self._links else None, lr=self.sparse_lr)
        alpha, eta = self._defaults()
        start = dense.snapshot()
        if self.algorithm is SyncAlgorithm.EASGD and not self._links:
            self._local_centre = start.clone()  # one process: the centre lives here
        if self.algorithm in _RULES:
            link = self._links[-1] if self._links else None
            group = self._groups[1 if self._background else 0]
            exchange = link.exchange_centre if link is not None else self._exchange_local
            self._rule = make_rule(
                self.algorithm, group=group, trainers=self.trainers, start=start,
                exchange_with_centre=exchange, moving_rate=alpha, block_momentum=eta,
                block_lr=self.block_lr, nesterov=self.nesterov,
            )  # fmt: skip
        return model, optimizer

    def _exchange_local(self, replica: torch.Tensor) -> torch.Tensor:
        assert self._local_centre is not None  # set in wrap for EASGD without servers
        return easgd_centre_update(self._local_centre, replica, self._defaults()[0])

    def before_step(self, optimizer: Any) -> None:
        if self._closed:
            return
        if self.algorithm is SyncAlgorithm.ALLREDUCE and self.trainers > 1:
            grads = []
            for p in self._params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
            distributed.all_reduce_sum_bucketed(grads, group=self._groups[0])
            torch._foreach_div_(grads, float(self.trainers))
        if self._sparse is not None:
            self._sparse.push(optimizer)

    def after_step(self, optimizer: Any) -> None:
        if self._closed:
            return
        if self._started is None:
            self._started = time.perf_counter()
        self._steps += 1

    def _record_sync(self, seconds: float, steps_during: int) -> None:
        self._syncs += 1
        self._sync_s += seconds
        self._steps_during += steps_during

    def stats(self) -> SyncStats:
        """Steps, syncs, syncs per second and the mean gap in steps between syncs, so far."""
        elapsed = 0.0 if self._started is None else time.perf_counter() - self._started
        syncs = self._syncs
        return SyncStats(
            steps=self._steps,
            syncs=syncs,
            elapsed_s=elapsed,
            syncs_per_s=syncs / elapsed if elapsed > 0 else 0.0,
            mean_gap_steps=self._steps / syncs if syncs else math.inf,
            mean_sync_s=self._sync_s / syncs if syncs else 0.0,
            mean_steps_during_sync=self._steps_during / syncs if syncs else 0.0,
            duty_cycle=self._current_duty(),
        )

    def _current_duty(self) -> float:
        return 1.0

    def replica_divergence(self) -> float:
        """RMS distance of the trainers' dense replicas to their mean, relative to its norm.

        A collective among the trainers (each calls it at the same point); 0 with one trainer.
        """
        if self._dense is None:
            raise RuntimeError("replica_divergence() needs a prepared model.")
        x = self._dense.snapshot().double()
        if self.trainers == 1:
            return 0.0
        total = x.clone()
        distributed.all_reduce_sum_bucketed([total], group=self._groups[0])
        mean = total / self.trainers
        spread = ((x - mean) ** 2).sum().reshape(1)
        distributed.all_reduce_sum_bucketed([spread], group=self._groups[0])
        return math.sqrt(float(spread) / self.trainers) / max(float(mean.norm()), 1e-30)

    @contextlib.contextmanager
    def quiesced(self) -> Iterator[None]:
        """Hold background syncs (none for a foreground strategy) while the block runs.

        Do not call collectives among trainers inside it: a peer's shadow thread may be waiting
        for this trainer's.
        """
        yield

    def state_dict(self) -> dict[str, Any]:
        with self.quiesced():
            state: dict[str, Any] = {
                "algorithm": self.algorithm.value,
                "steps": self._steps,
                "syncs": self._syncs,
            }
            state["rule"] = self._rule.state_dict() if self._rule is not None else {}
            if self.algorithm is SyncAlgorithm.EASGD and self._dense is not None:
                like = self._dense.snapshot()
                state["centre"] = (
                    self._links[0].get_centre(like) if self._links else self._local_centre_copy()
                )
            if self._sparse is not None and self._sparse.modules:
                state["sparse"] = self._sparse.tables()
            return state

    def _local_centre_copy(self) -> torch.Tensor | None:
        return None if self._local_centre is None else self._local_centre.clone()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("algorithm") != self.algorithm.value:
            raise ValueError(
                f"This state is for algorithm {state.get('algorithm')!r}, not {self.algorithm.value!r}."
            )
        with self.quiesced():
            self._steps = int(state["steps"])
            self._syncs = int(state["syncs"])
            if self._rule is not None:
                self._rule.load_state_dict(state["rule"])
            if "centre" in state and state["centre"] is not None:
                if self._links:
                    self._links[0].set_centre(state["centre"])
                elif self._local_centre is not None:
                    self._local_centre.copy_(state["centre"])
            if "sparse" in state and self._sparse is not None:
                self._sparse.load_tables(state["sparse"])

    def _stop_background(self) -> None:
        """Stop and join the background thread (none here)."""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._stop_background()
        finally:
            if self._sparse is not None:
                self._sparse.remove()
            for link in self._links:
                link.close()
            if self._rule is not None:
                self._rule.release()
            for group in self._groups:
                distributed.destroy_subgroup(group)
            self._groups = []  # no reference left: gloo's threads of these groups end now

    # -- server side ------------------------------------------------------------------------
    def serve(self, model: nn.Module) -> dict[str, int]:
        """On a server rank: hold ``model``'s sparse tables (and EASGD's centre) for the trainers.

        Builds the same model as the trainers and blocks until every trainer has closed its
        strategy; returns how many requests of each kind were answered.
        """
        if not self.is_server:
            raise RuntimeError(
                f"Rank {distributed.rank()} is a trainer of this strategy: call train.prepare."
            )
        sparse, dense = self._setup(model)
        holds_centre = distributed.rank() == distributed.world_size() - 1  # the last server
        centre = dense.snapshot() if self.algorithm is SyncAlgorithm.EASGD and holds_centre else None
        try:
            return serve(
                tables=[w.data for w in SparseTables(sparse, link=None, lr=None).weights],
                centre=centre,
                moving_rate=self._defaults()[0],
                trainers=list(range(self.trainers)),
                groups=self._groups[2 if self._background else 1 :],
            )
        finally:
            for group in self._groups:
                distributed.destroy_subgroup(group)
            self._groups = []


class ForegroundSync(_ReplicaSync):
    """The foreground counterparts: sync the dense replicas every ``period`` steps, and wait.

    ``algorithm`` is EASGD, MA or BMUF (run inside ``optimizer.step()`` every ``period``
    steps), ALLREDUCE (dense gradients averaged before every step: synchronous data
    parallelism; ``period`` is ignored) or NONE (replicas never synced: the throughput bound).
    Sparse tables, servers and the rules' knobs are as in :class:`ShadowSync`.

    Example:
        >>> from dtune.train._shadowsync import ForegroundSync
        >>> from dtune.train._sync_algorithms import SyncAlgorithm
        >>> strategy = ForegroundSync(algorithm=SyncAlgorithm.BMUF, period=10)
        >>> # model, optimizer = train.prepare(model, optimizer, strategy=strategy)
    """

    def __init__(
        self,
        *,
        algorithm: SyncAlgorithm,
        period: int = 1,
        servers: int = 0,
        sparse_modules: Sequence[str] | None = None,
        sparse_lr: float | None = None,
        moving_rate: float | None = None,
        block_momentum: float | None = None,
        block_lr: float = 1.0,
        nesterov: bool = True,
        dedicated_sync_server: bool = False,
    ) -> None:
        super().__init__(
            algorithm=algorithm, servers=servers, sparse_modules=sparse_modules, sparse_lr=sparse_lr,
            moving_rate=moving_rate, block_momentum=block_momentum, block_lr=block_lr, nesterov=nesterov,
            dedicated_sync_server=dedicated_sync_server,
        )  # fmt: skip
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"The value of `period` is {period!r}, but must be an integer >= 1.")
        self.period = period

    def after_step(self, optimizer: Any) -> None:
        super().after_step(optimizer)
        if self._closed or self._rule is None or self._dense is None or self._steps % self.period:
            return
        start = time.perf_counter()
        sent = self._dense.snapshot()
        new, _ = self._rule.exchange(sent)
        self._dense.copy_(new)  # nothing trained meanwhile: delta and overwrite agree
        self._record_sync(time.perf_counter() - start, 0)


class ShadowSync(_ReplicaSync):
    """Sync dense replicas from a background thread, as often as the link allows.

    ``algorithm`` is EASGD (needs ``servers >= 1``: the centre lives on the last server), MA
    or BMUF. ``apply`` picks delta (default; keeps the steps taken during a sync) or overwrite.
    Sparse modules (default: every ``nn.Embedding``/``nn.EmbeddingBag``; ``[]`` for none) keep
    their tables on the ``servers`` last ranks and are updated there by SGD at ``sparse_lr``
    (default: the learning rate of their optimizer param group). ``moving_rate`` defaults to
    0.9/m, ``block_momentum`` to 1 - 1/m for m trainers. ``duty_cycle`` is the fraction of wall
    time the thread may spend syncing: 1 (default, the paper's setting) syncs back to back; 0.25
    waits three times as long as each sync took, which leaves a shared link (and, on a host short
    of cores, the CPU) mostly to training, whatever the link's speed. ``max_slowdown`` (e.g.
    0.05) adapts the duty cycle instead (at most ``duty_cycle``): the thread measures how fast
    training steps while it syncs and while it rests, and syncs as much as keeps training within
    that fraction of its rate at rest (:class:`~dtune.train._pacing.SlowdownPacer`); the duty
    cycle in use is in :meth:`stats`. The rate at rest is this trainer's own: where other
    processes' syncs slow it too (cores shared by every trainer and server), training loses
    more than the budget against a run without syncs. ``dedicated_sync_server``
    keeps EASGD's centre alone on the last server (``servers >= 2``), away from the tables.
    ``nice`` (0 to 19, added to the niceness like the ``nice`` command) lowers the shadow thread's
    CPU priority (Linux schedules threads, so only this thread is affected): on a host with
    fewer cores than busy threads, training goes first and the sync rate takes what is left. It
    does not stop the thread from holding the GIL.
    :meth:`stats` reports syncs per second and the gap in steps between syncs.

    Example:
        >>> from dtune.train._shadowsync import ShadowSync
        >>> from dtune.train._sync_algorithms import SyncAlgorithm
        >>> strategy = ShadowSync(algorithm=SyncAlgorithm.MA)
        >>> # model, optimizer = train.prepare(model, optimizer, strategy=strategy)
        >>> # ...train...; strategy.stats().syncs_per_s
    """

    _background = True

    def __init__(
        self,
        *,
        algorithm: SyncAlgorithm,
        apply: Apply = Apply.DELTA,
        servers: int = 0,
        duty_cycle: float = 1.0,
        sparse_modules: Sequence[str] | None = None,
        sparse_lr: float | None = None,
        moving_rate: float | None = None,
        block_momentum: float | None = None,
        block_lr: float = 1.0,
        nesterov: bool = True,
        dedicated_sync_server: bool = False,
        nice: int = 0,
        max_slowdown: float | None = None,
    ) -> None:
        super().__init__(
            algorithm=algorithm, servers=servers, sparse_modules=sparse_modules, sparse_lr=sparse_lr,
            moving_rate=moving_rate, block_momentum=block_momentum, block_lr=block_lr, nesterov=nesterov,
            dedicated_sync_server=dedicated_sync_server,
        )  # fmt: skip
        if algorithm not in _RULES:
            raise ValueError(f"The value of `algorithm` is {algorithm}, but must be one of EASGD, MA, BMUF.")
        if not isinstance(apply, Apply):
            raise TypeError(f"`apply` must be an Apply, got {apply!r}.")
        if not 0 < duty_cycle <= 1:
            raise ValueError(f"The value of `duty_cycle` is {duty_cycle}, but must be in (0, 1].")
        if isinstance(nice, bool) or not isinstance(nice, int) or not 0 <= nice <= 19:
            raise ValueError(f"The value of `nice` is {nice!r}, but must be an integer in [0, 19].")
        self.apply = apply
        self.duty_cycle = duty_cycle
        self.nice = nice
        self.max_slowdown = max_slowdown
        self._pacer = None if max_slowdown is None else SlowdownPacer(max_slowdown)
        self._cond = threading.Condition()
        self._pauses = 0
        self._in_round = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._recent: collections.deque[float] = collections.deque(maxlen=16)  # sync durations, s

    def _paired(self) -> bool:
        return self.algorithm is not SyncAlgorithm.EASGD and self.trainers > 1

    def after_step(self, optimizer: Any) -> None:
        super().after_step(optimizer)
        if self._error is not None:
            raise RuntimeError("ShadowSync's shadow thread failed (see the cause).") from self._error
        if self._thread is None and not self._closed and (self._paired() or bool(self._links)):
            self._thread = threading.Thread(
                target=self._run, name=f"dtune-shadow-{distributed.rank()}", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        try:
            if self.nice:  # this thread only: on Linux a thread id is a process id for setpriority
                me = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, me, min(19, os.getpriority(os.PRIO_PROCESS, me) + self.nice))
            while True:
                with self._cond:
                    while self._pauses and not self._stop:
                        self._cond.wait()
                    stop, self._in_round = self._stop, True
                start, steps = time.perf_counter(), self._steps
                try:
                    leaving = self._round(stop)
                finally:
                    with self._cond:
                        self._in_round = False
                        self._cond.notify_all()
                if leaving:
                    return
                rest_start, rest_steps = time.perf_counter(), self._steps
                self._recent.append(rest_start - start)
                pause = pause_after(self._recent, self._current_duty())
                if pause > 0:
                    with self._cond:
                        self._cond.wait_for(lambda: self._stop, timeout=pause)
                if self._pacer is not None:
                    self._pacer.record(
                        synced_s=rest_start - start,
                        sync_steps=rest_steps - steps,
                        rested_s=time.perf_counter() - rest_start,
                        rest_steps=self._steps - rest_steps,
                    )
        except BaseException as exc:  # raised in the training thread at its next step
            self._error = exc

    def _current_duty(self) -> float:
        if self._pacer is None:
            return self.duty_cycle
        return min(self.duty_cycle, self._pacer.duty_cycle())

    def _round(self, stop: bool) -> bool:
        assert self._rule is not None and self._dense is not None  # the thread starts after wrap
        start, steps = time.perf_counter(), self._steps
        sent = self._dense.snapshot()
        new, stopping = self._rule.exchange(sent, stop)
        self._dense.apply(new, sent, self.apply)
        self._record_sync(time.perf_counter() - start, self._steps - steps)
        return stop or stopping

    @contextlib.contextmanager
    def quiesced(self) -> Iterator[None]:
        """Wait for the sync in flight, hold the shadow thread while the block runs, then resume.

        Save or load a consistent checkpoint inside it (``state_dict`` and ``load_state_dict``
        use it themselves). Do not call collectives among trainers inside it: a peer's shadow
        thread may be waiting for this trainer's.
        """
        with self._cond:
            self._pauses += 1
            while self._in_round:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._pauses -= 1
                self._cond.notify_all()

    def _stop_background(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        elif self._paired() and self._rule is not None and self._dense is not None:
            # Never started: the peers' threads may be waiting for this trainer's first round.
            self._rule.exchange(self._dense.snapshot(), True)
