"""Training loops run by worker processes in the ShadowSync tests (2 trainers, maybe 1 server)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import dtune
from dtune import train
from dtune.models import DLRM
from dtune.runtime import distributed
from dtune.train._shadowsync import ForegroundSync, ShadowSync
from dtune.train._sync_algorithms import Apply, SyncAlgorithm

HANG_GUARD_S = 60.0  # only bounds a wait that a bug could make endless; never a timing assertion


def _wait(event: threading.Event, what: str) -> None:
    if not event.wait(HANG_GUARD_S):
        raise TimeoutError(f"{what} did not happen within {HANG_GUARD_S} s")


def _wait_until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {HANG_GUARD_S} s")
        time.sleep(0.005)


def _dtune_threads() -> list[str]:
    return sorted(
        t.name for t in threading.enumerate() if t.name.startswith(("dtune-shadow", "dtune-server"))
    )


def _trainer_barrier(group: Any) -> None:
    distributed.all_reduce_sum_bucketed([torch.zeros(1)], group=group)


def _gather(obj: Any, group: Any) -> list[Any]:
    return distributed.all_gather_object(obj, group=group)


def hand_made_rules(config: dict[str, Any]) -> Any:
    """Two replicas [1, 2] and [3, 6], one foreground sync each (lr 0), per algorithm."""
    trainers = config["trainers"]
    out = {}
    for name in ("ma", "bmuf", "easgd"):
        strategy = ForegroundSync(
            algorithm=SyncAlgorithm(name), period=1, servers=2, dedicated_sync_server=True
        )
        model = nn.Linear(2, 1, bias=False)
        if strategy.is_server:
            strategy.serve(model)
            continue
        model, optimizer = train.prepare(
            model, torch.optim.SGD(model.parameters(), lr=0.0), strategy=strategy
        )
        with torch.no_grad():
            model.weight.copy_(
                torch.tensor([[1.0, 2.0]]) if distributed.rank() == 0 else torch.tensor([[3.0, 6.0]])
            )
        state = strategy.state_dict()
        if name == "bmuf":
            state["rule"] = {"global": torch.zeros(2), "momentum": torch.full((2,), 0.5)}
        if name == "easgd":
            state["centre"] = torch.zeros(2)
        strategy.load_state_dict(state)
        _trainer_barrier(trainers)  # both replicas and the centre are set before anyone syncs
        optimizer.step()
        _trainer_barrier(trainers)
        after = strategy.state_dict()
        mine = {
            "x": model.weight.detach().reshape(-1).clone(),
            "rule": after["rule"],
            "centre": after.get("centre"),
        }
        out[name] = _gather(mine, trainers)
        out[name + "_syncs"] = strategy.stats().syncs
        strategy.close()
    return out


def _toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _toy_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * step + distributed.rank())
    x = torch.randn(16, 4, generator=gen)
    return x, x.sum(1, keepdim=True) * (1.0 + distributed.rank())


def _toy_step(model: nn.Module, optimizer: Any, step: int) -> None:
    x, y = _toy_batch(step)
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()


class _HeldExchange:
    """Wraps a rule's exchange: the first sync waits for ``release``, the later ones for ``hold``."""

    def __init__(self, original: Any) -> None:
        self.original = original
        self.entered, self.release, self.second, self.hold = (threading.Event() for _ in range(4))
        self.sent: torch.Tensor | None = None
        self.new: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, stop: bool = False) -> tuple[torch.Tensor, bool]:
        if self.sent is None:
            self.sent = x.clone()
            self.entered.set()
            _wait(self.release, "release")
            new, stopping = self.original(x, stop)
            self.new = new.clone()
            return new, stopping
        self.second.set()  # the first sync has been applied once the second one starts
        if not stop:
            _wait(self.hold, "hold")
        return self.original(x, stop)


def slow_sync(config: dict[str, Any]) -> Any:
    """A shadow sync held in flight on an Event while the training thread counts steps."""
    out = {}
    for how in (Apply.DELTA, Apply.OVERWRITE):
        strategy = ShadowSync(algorithm=SyncAlgorithm.MA, apply=how, servers=1)  # the server idles
        model = _toy_model()
        if strategy.is_server:
            strategy.serve(model)
            continue
        model, optimizer = train.prepare(
            model, torch.optim.SGD(model.parameters(), lr=0.05), strategy=strategy
        )
        rule, dense = strategy._rule, strategy._dense
        assert rule is not None and dense is not None
        held = _HeldExchange(rule.exchange)
        rule.exchange = held  # type: ignore[method-assign]
        _toy_step(model, optimizer, 0)  # the first step starts the shadow thread
        _wait(held.entered, "the first shadow sync")
        for step in range(1, 1 + config["steps"]):
            _toy_step(model, optimizer, step)
        stats = strategy.stats()
        saver = threading.Thread(target=strategy.state_dict)  # quiesced: must wait for the sync
        saver.start()
        saver.join(0.2)
        saver_waited = saver.is_alive()
        local = dense.snapshot()
        held.release.set()
        _wait(held.second, "the second shadow sync")
        saver.join(HANG_GUARD_S)
        synced = dense.snapshot()
        assert held.sent is not None and held.new is not None
        expected = local + held.new - held.sent if how is Apply.DELTA else held.new
        out[how.value] = {
            "steps_while_in_flight": stats.steps - 1,
            "syncs_while_in_flight": stats.syncs,
            "saver_waited_for_sync": saver_waited,
            "saver_finished": not saver.is_alive(),
            "error": float((synced - expected).abs().max()),
            "local_updates_size": float((local - held.sent).abs().max()),
            "distance_to_plain_result": float((synced - held.new).abs().max()),
            "syncs_after": strategy.stats().syncs,
        }
        held.hold.set()
        strategy.close()
        out[how.value]["threads_after_close"] = _dtune_threads()
    return out


def shadow_cases(config: dict[str, Any]) -> Any:
    """Background-sync cases in one group of 2 trainers and 1 server (a launch costs seconds)."""
    return {"slow_sync": slow_sync(config), "converge": converge(config)}


def _settle(strategy: ShadowSync, trainers: Any, rounds: int) -> None:
    """Training over: rounds in which every trainer syncs at least once after all have finished.

    EASGD's syncs meet a shared centre in whatever order the shadow threads reach it; a trainer
    that syncs many times before its peer does only agrees with the centre, so the spread shrinks
    per round in which both have synced (at least by half), not per sync.
    """
    for _ in range(rounds):
        _trainer_barrier(trainers)
        done = strategy.stats().syncs
        _wait_until(lambda done=done: strategy.stats().syncs > done, "a settling sync")


def converge(config: dict[str, Any]) -> Any:
    """Each trainer fits its own target (y = (1 + rank) sum x); syncs pull the replicas together."""
    trainers = distributed.new_group([0, 1])
    out = {}
    for name in ("none", "ma", "bmuf", "easgd"):
        algorithm = SyncAlgorithm(name)
        if algorithm is SyncAlgorithm.NONE:
            strategy: ForegroundSync | ShadowSync = ForegroundSync(algorithm=algorithm, servers=1)
        else:  # MA's shadow thread also runs niced and EASGD's paced to a slowdown budget, which
            # must change nothing but the thread's priority and how long it rests
            strategy = ShadowSync(
                algorithm=algorithm,
                servers=1,
                nice=5 if name == "ma" else 0,
                max_slowdown=0.2 if name == "easgd" else None,
            )
        torch.manual_seed(0)
        model = nn.Linear(4, 1)  # least squares: trainer r's optimum is (1 + r) * ones
        if strategy.is_server:
            strategy.serve(model)
            continue
        model, optimizer = train.prepare(
            model, torch.optim.SGD(model.parameters(), lr=0.05), strategy=strategy
        )
        for step in range(config["train_steps"]):
            _toy_step(model, optimizer, step)
        done, duty = strategy.stats().syncs, strategy.stats().duty_cycle
        niceness = {
            t.name: os.getpriority(os.PRIO_PROCESS, t.native_id)
            for t in threading.enumerate()
            if t.native_id is not None and (t.name.startswith("dtune-shadow") or t is threading.main_thread())
        }
        if algorithm is not SyncAlgorithm.NONE:
            _settle(strategy, trainers, config["settle"])
        _trainer_barrier(trainers)
        divergence = strategy.replica_divergence()
        x = torch.randn(512, 4, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():  # the task both trainers share: the mean of their targets
            loss = float(nn.functional.mse_loss(model(x), 1.5 * x.sum(1, keepdim=True)))
        out[name] = {
            "divergence": divergence, "global_loss": _gather(loss, trainers), "syncs": done, "nice": niceness,
            "duty": duty,
        }  # fmt: skip
        strategy.close()
        out[name]["os_threads_after_close"] = len(os.listdir("/proc/self/task"))  # gloo's included
    return out


def _tiny_dlrm() -> DLRM:
    return DLRM(vocab_sizes=[50, 80], dense_features=3, embedding_dim=4, bottom=(8,), top=(8,), seed=3)


def _ctr_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + distributed.rank())
    sparse = torch.stack(
        [torch.randint(0, 50, (32,), generator=gen), torch.randint(0, 80, (32,), generator=gen)], 1
    )
    return torch.randn(32, 3, generator=gen), sparse, torch.bernoulli(torch.full((32,), 0.3), generator=gen)


def _ctr_step(model: nn.Module, optimizer: Any, step: int) -> None:
    dense, sparse, labels = _ctr_batch(step)
    optimizer.zero_grad()
    nn.functional.binary_cross_entropy_with_logits(model(dense, sparse), labels).backward()
    optimizer.step()


def _ctr_prepare(strategy: Any) -> tuple[Any, Any]:
    model = _tiny_dlrm()
    dense = [p for n, p in model.named_parameters() if not n.startswith("embeddings")]
    return train.prepare(model, torch.optim.SGD(dense, lr=0.1), strategy=strategy)


def checkpoint_round_trip(config: dict[str, Any]) -> Any:
    """Train, save quiesced; then a fresh strategy and model load it (a resume) and save again."""
    out = {}
    for name in ("easgd", "bmuf"):
        saved = None
        for phase in ("train", "resume"):
            strategy = ShadowSync(
                algorithm=SyncAlgorithm(name), servers=2, dedicated_sync_server=name == "easgd", sparse_lr=0.5
            )
            if strategy.is_server:
                strategy.serve(_tiny_dlrm())
                continue
            model, optimizer = _ctr_prepare(strategy)
            if phase == "train":
                for step in range(12):
                    _ctr_step(model, optimizer, step)
                with strategy.quiesced():
                    saved = {"strategy": strategy.state_dict(), "model": train.unwrap(model).state_dict()}
            else:
                saved = _gather(saved, config["trainers"])[0]  # every rank resumes from rank 0's
                with strategy.quiesced():
                    train.unwrap(model).load_state_dict(saved["model"])
                    strategy.load_state_dict(saved["strategy"])
                out[name] = {"saved": saved["strategy"], "restored": strategy.state_dict()}
            strategy.close()
    return out


def single_trainer_parity(config: dict[str, Any]) -> Any:
    """Only trainer 0 trains, against tables row-sharded over 2 servers: as in one process."""
    strategy = ForegroundSync(algorithm=SyncAlgorithm.NONE, servers=2, sparse_lr=0.5)
    if strategy.is_server:
        return strategy.serve(_tiny_dlrm())
    model, optimizer = _ctr_prepare(strategy)
    for step in range(6 if distributed.rank() == 0 else 0):
        _ctr_step(model, optimizer, step)
    trainers = config["trainers"]
    _trainer_barrier(trainers)  # trainer 0's last push has been sent before anyone reads
    tables = strategy.state_dict()["sparse"]  # (pushes and reads share one ordered link)
    dense = {
        n: p.detach().clone() for n, p in train.unwrap(model).named_parameters() if n != "embeddings.weight"
    }
    strategy.close()
    return {"tables": tables, "dense": dense}


def server_cases(config: dict[str, Any]) -> Any:
    """The cases that need 2 trainers and 2 servers, in one group (a launch costs seconds)."""
    trainers = distributed.new_group([0, 1])  # every rank, the server too, creates it
    return {
        "rules": hand_made_rules({"trainers": trainers}),
        "parity": single_trainer_parity({"trainers": trainers}),
        "checkpoint": checkpoint_round_trip({"trainers": trainers}),
    }


def shutdown(config: dict[str, Any]) -> Any:
    """Exit paths: normal close, close before the first step, a raise, a SIGKILL."""
    directory = Path(config["dir"])
    rank = distributed.rank()

    def record(tag: str) -> None:
        (directory / f"{tag}-{rank}.json").write_text(json.dumps(_dtune_threads()))

    distributed.on_group_exit(lambda: record("exit"))  # runs after the strategies' own close
    if config["how"] == "normal":
        for name in ("ma", "easgd"):
            strategy = ShadowSync(algorithm=SyncAlgorithm(name), servers=1, sparse_lr=0.5)
            if strategy.is_server:
                strategy.serve(_tiny_dlrm())
                record(f"{name}-served")
                continue
            model, optimizer = _ctr_prepare(strategy)
            steps = 0 if rank == 1 and name == "ma" else 20  # rank 1 leaves before its first step
            for step in range(steps):
                _ctr_step(model, optimizer, step)
            strategy.close()
            for step in range(3):  # training on after close: local tables, no sync, no server
                _ctr_step(model, optimizer, 100 + step)
            record(f"{name}-closed")
        return "done"
    strategy = ShadowSync(algorithm=SyncAlgorithm.MA, servers=1, sparse_lr=0.5)
    if strategy.is_server:
        strategy.serve(_tiny_dlrm())
        return "served"
    model, optimizer = _ctr_prepare(strategy)
    for step in range(40):
        _ctr_step(model, optimizer, step)
        if step == 10 and rank == 1:
            if config["how"] == "raise":
                raise ValueError("trainer failure while the shadow thread runs")
            os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(HANG_GUARD_S)  # rank 0 waits here to be stopped with the group
    return "unreachable"


PBT_STEPS_PER_EPOCH = 5


def pbt_trial(config: dict[str, Any]) -> None:
    """A 2-worker S-BMUF trial for PBT: its checkpoint holds the model and the strategy's state.

    Reports the strategy's step counter, which only a restored strategy state carries over: a
    copy that PBT starts from a donor's checkpoint must go on counting from the donor's steps.
    """
    strategy = ShadowSync(algorithm=SyncAlgorithm.BMUF)
    model = _toy_model()
    model, optimizer = train.prepare(
        model, torch.optim.SGD(model.parameters(), lr=config["lr"]), strategy=strategy
    )
    start = 0
    checkpoint = dtune.get_checkpoint()
    if checkpoint is not None:
        state = checkpoint.to_dict()
        with strategy.quiesced():
            train.unwrap(model).load_state_dict(state["model"])
            strategy.load_state_dict(state["strategy"])
        start = state["epoch"]
    held_out = torch.Generator().manual_seed(12345)
    x_test = torch.randn(256, 4, generator=held_out)
    for epoch in range(start, config["epochs"]):
        for step in range(PBT_STEPS_PER_EPOCH):
            _toy_step(model, optimizer, epoch * PBT_STEPS_PER_EPOCH + step)
        with strategy.quiesced():  # the model and the strategy's state of one moment
            state = {
                "model": train.unwrap(model).state_dict(),
                "strategy": strategy.state_dict(),
                "epoch": epoch + 1,
            }
        with torch.no_grad():
            loss = nn.functional.mse_loss(model(x_test), x_test.sum(1, keepdim=True) * 1.5).item()
        main = train.context().is_main
        dtune.report(
            {"loss": loss, "strategy_steps": state["strategy"]["steps"], "syncs": strategy.stats().syncs},
            checkpoint=dtune.Checkpoint.from_dict(state) if main else None,
        )
