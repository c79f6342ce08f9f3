"""ShadowSync and its foreground counterparts: update rules, background syncs, servers, shutdown."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from torch import nn

import dtune
from dtune import train
from dtune.models import DLRM
from dtune.train._pacing import SlowdownPacer, pause_after
from dtune.train._servers import SparseTables
from dtune.train._shadowsync import ForegroundSync, ShadowSync
from dtune.train._sync_algorithms import (
    Apply,
    DenseReplica,
    SyncAlgorithm,
    bmuf_update,
    easgd_centre_update,
    easgd_replica_update,
)
from dtune.tune.trial import TrialStatus
from tests.train import _shadow_loops as L

X0, X1 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])  # the hand-made two replicas


# -- the update rules, by hand -------------------------------------------------------------------
def test_easgd_rule_on_two_replicas_by_hand():
    centre, alpha = torch.zeros(2), 0.45  # alpha = 0.9 / m for m = 2
    before = easgd_centre_update(centre, X0, alpha)  # trainer 0 first
    assert torch.equal(before, torch.zeros(2))
    torch.testing.assert_close(easgd_replica_update(X0, before, alpha), torch.tensor([0.55, 1.1]))
    torch.testing.assert_close(centre, torch.tensor([0.45, 0.9]))
    before = easgd_centre_update(centre, X1, alpha)  # then trainer 1 meets the moved centre
    torch.testing.assert_close(easgd_replica_update(X1, before, alpha), torch.tensor([1.8525, 3.705]))
    torch.testing.assert_close(centre, torch.tensor([1.5975, 3.195]))


@pytest.mark.parametrize(
    ("nesterov", "x_new", "global_model", "momentum"),
    [(True, [3.0, 6.0], [2.0, 4.0], [2.0, 4.0]), (False, [2.25, 4.25], [2.25, 4.25], [2.25, 4.25])],
)
def test_bmuf_rule_on_two_replicas_by_hand(nesterov, x_new, global_model, momentum):
    # mean [2, 4]; w = 0, D = 0.5, eta = 1 - 1/2, zeta = 1. Nesterov: the block started from
    # s = w + eta D = 0.25, so G = [1.75, 3.75], D = 0.25 + G, w = D, x_new = w + eta D.
    w, d = torch.zeros(2), torch.full((2,), 0.5)
    got = bmuf_update((X0 + X1) / 2, w, d, block_momentum=0.5, block_lr=1.0, nesterov=nesterov)
    torch.testing.assert_close(got, torch.tensor(x_new))
    torch.testing.assert_close(w, torch.tensor(global_model))
    torch.testing.assert_close(d, torch.tensor(momentum))


def test_bmuf_momentum_decays_when_replicas_make_no_progress():
    w, d = torch.zeros(3), torch.ones(3)
    x = w + 0.75 * d
    for _ in range(40):  # many blocks with no local progress: what a fast shadow thread sees
        x = bmuf_update(x.clone(), w, d, block_momentum=0.75, block_lr=1.0, nesterov=True)
    assert float(d.abs().max()) < 1e-4 and float(w.abs().max()) < 4.0


@pytest.fixture(scope="module")
def server_cases():
    """One launch (2 trainers + 2 servers) for the hand-made rules, server parity and checkpoints."""
    return train.launch(L.server_cases, workers=4).value


def test_foreground_rules_in_two_processes_match_the_hand_made_case(server_cases):
    out = server_cases["rules"]
    for rank in (0, 1):
        torch.testing.assert_close(out["ma"][rank]["x"], torch.tensor([2.0, 4.0]))
        torch.testing.assert_close(out["bmuf"][rank]["x"], torch.tensor([3.0, 6.0]))
        torch.testing.assert_close(out["bmuf"][rank]["rule"]["global"], torch.tensor([2.0, 4.0]))
        torch.testing.assert_close(out["bmuf"][rank]["rule"]["momentum"], torch.tensor([2.0, 4.0]))
    # EASGD: the server serves the two exchanges in either order; both orders are hand-computed
    x0, x1 = (out["easgd"][rank]["x"] for rank in (0, 1))
    centre = out["easgd"][0]["centre"]
    zero_first = (torch.tensor([0.55, 1.1]), torch.tensor([1.8525, 3.705]), torch.tensor([1.5975, 3.195]))
    one_first = (torch.tensor([1.1575, 2.315]), torch.tensor([1.65, 3.3]), torch.tensor([1.1925, 2.385]))
    assert any(
        all(torch.allclose(a, b) for a, b in zip((x0, x1, centre), case, strict=True))
        for case in (zero_first, one_first)
    ), (x0, x1, centre)
    assert out["ma_syncs"] == out["bmuf_syncs"] == out["easgd_syncs"] == 1


# -- applying a sync: delta keeps what was trained meanwhile ---------------------------------------
def test_delta_apply_keeps_concurrent_local_updates_and_overwrite_drops_them():
    params = [torch.tensor([1.0, 1.0]), torch.tensor([[2.0]])]
    buffers = [torch.tensor([5.0]), torch.tensor(3, dtype=torch.long)]  # the counter is not synced
    replica = DenseReplica(params, buffers)
    assert replica.numel == 4
    sent = replica.snapshot()
    params[0].add_(10.0)  # a local step while the sync was in flight
    new = sent + 1.0  # what the sync returned for what was sent
    replica.apply(new, sent, Apply.DELTA)
    torch.testing.assert_close(replica.snapshot(), torch.tensor([12.0, 12.0, 3.0, 6.0]))
    replica.apply(new, replica.snapshot(), Apply.OVERWRITE)
    torch.testing.assert_close(replica.snapshot(), new)
    assert int(buffers[1]) == 3


STEPS_IN_FLIGHT = 25


@pytest.fixture(scope="module")
def shadow_cases():
    """One launch (2 trainers + 1 server) for the slow-sync and convergence cases."""
    config = {"steps": STEPS_IN_FLIGHT, "train_steps": 150, "settle": 12}
    return train.launch(L.shadow_cases, workers=3, config=config).value


def test_shadow_thread_never_blocks_the_training_thread(shadow_cases):
    steps = STEPS_IN_FLIGHT
    out = shadow_cases["slow_sync"]
    for how in ("delta", "overwrite"):
        case = out[how]
        # the training thread took every step while the first sync was held in flight
        assert case["steps_while_in_flight"] == steps and case["syncs_while_in_flight"] == 0
        assert case["saver_waited_for_sync"] and case["saver_finished"]  # state_dict is quiesced
        assert case["error"] < 1e-6  # the replica holds exactly what `apply` promises
        assert case["local_updates_size"] > 1e-3
        assert case["threads_after_close"] == []
    assert out["delta"]["distance_to_plain_result"] > 1e-3  # local updates kept
    assert out["overwrite"]["distance_to_plain_result"] < 1e-6  # local updates lost


# -- convergence ----------------------------------------------------------------------------------
def test_replicas_converge_on_a_toy_problem(shadow_cases):
    out = shadow_cases["converge"]
    alone = out["none"]
    assert alone["divergence"] > 0.05  # each replica fits its own target
    for name in ("ma", "bmuf", "easgd"):
        synced = out[name]
        assert synced["syncs"] > 0
        assert synced["divergence"] < 0.01 * alone["divergence"], (name, synced, alone)
        if name != "bmuf":  # BMUF's block momentum keeps moving the agreed model after training
            # stops, so how well it fits depends on how many syncs land after the last step
            # the agreed model fits the shared task better than either replica trained alone
            assert max(synced["global_loss"]) < min(alone["global_loss"]), (name, synced, alone)
    main = out["ma"]["nice"]["MainThread"]
    assert out["ma"]["nice"] == {"MainThread": main, "dtune-shadow-0": min(19, main + 5)}  # MA: nice=5
    assert set(out["easgd"]["nice"].values()) == {main}  # the default leaves the thread alone
    # closing a strategy ends the threads of its process groups: none pile up strategy after strategy
    threads = [out[name]["os_threads_after_close"] for name in ("none", "ma", "bmuf", "easgd")]
    assert max(threads) - threads[0] <= 2, threads  # a leak was 4-8 threads per strategy
    assert out["ma"]["duty"] == 1.0 and 1e-3 <= out["easgd"]["duty"] <= 0.9  # paced: within its limits


# -- servers, checkpoints -------------------------------------------------------------------------
def _local_reference(steps: int, lr: float, sparse_lr: float):
    model = L._tiny_dlrm()
    dense = [p for n, p in model.named_parameters() if n != "embeddings.weight"]
    optimizer, tables = (
        torch.optim.SGD(dense, lr=lr),
        torch.optim.SGD([model.embeddings.weight], lr=sparse_lr),
    )
    for step in range(steps):
        d, s, y = L._ctr_batch(step)  # rank 0's batches (no process group here)
        optimizer.zero_grad()
        tables.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(model(d, s), y).backward()
        optimizer.step()
        tables.step()
    return model


def test_embedding_server_training_equals_local_training(server_cases):
    served = server_cases["parity"]  # trainer 0 alone trains, rows sharded over 2 servers
    reference = _local_reference(steps=6, lr=0.1, sparse_lr=0.5)
    torch.testing.assert_close(served["tables"]["embeddings"], reference.embeddings.weight.detach())
    for name, value in served["dense"].items():
        torch.testing.assert_close(value, dict(reference.named_parameters())[name].detach())


def test_one_process_strategy_updates_sparse_tables_locally():
    strategy = ForegroundSync(algorithm=SyncAlgorithm.NONE, sparse_lr=0.5)
    model, optimizer = L._ctr_prepare(strategy)
    for step in range(6):
        L._ctr_step(model, optimizer, step)
    reference = _local_reference(steps=6, lr=0.1, sparse_lr=0.5)
    torch.testing.assert_close(model.embeddings.weight, reference.embeddings.weight)
    torch.testing.assert_close(model.top[0].weight, reference.top[0].weight)
    strategy.close()


def test_sparse_tables_take_the_learning_rate_of_their_param_group_and_drop_the_gradient():
    bag = nn.EmbeddingBag(10, 3, mode="sum", sparse=False)
    optimizer = torch.optim.SGD([{"params": [bag.weight], "lr": 0.25}])
    tables = SparseTables([("bag", bag)], link=None, lr=None)
    before = bag.weight.detach().clone()
    bag(torch.tensor([[4, 4, 7]])).sum().backward()
    tables.push(optimizer)
    assert bag.weight.grad is None
    expected = before.clone()
    expected[4] -= 0.25 * 2
    expected[7] -= 0.25
    torch.testing.assert_close(bag.weight.detach(), expected)


def test_checkpoint_holds_the_full_strategy_state_and_restores_it(server_cases):
    out = server_cases["checkpoint"]
    for name in ("easgd", "bmuf"):
        saved, restored = out[name]["saved"], out[name]["restored"]
        assert saved["steps"] == restored["steps"] == 12 and saved["syncs"] == restored["syncs"] > 0
        torch.testing.assert_close(saved["sparse"]["embeddings"], restored["sparse"]["embeddings"])
        assert not torch.allclose(saved["sparse"]["embeddings"], L._tiny_dlrm().embeddings.weight)  # trained
    torch.testing.assert_close(out["easgd"]["saved"]["centre"], out["easgd"]["restored"]["centre"])
    for key in ("global", "momentum"):
        torch.testing.assert_close(out["bmuf"]["saved"]["rule"][key], out["bmuf"]["restored"]["rule"][key])
    assert float(out["bmuf"]["saved"]["rule"]["momentum"].abs().max()) > 0


def test_state_of_another_algorithm_is_refused():
    strategy = ForegroundSync(algorithm=SyncAlgorithm.MA)
    with pytest.raises(ValueError, match="algorithm 'bmuf'"):
        strategy.load_state_dict({"algorithm": "bmuf", "steps": 0, "syncs": 0, "rule": {}})


# -- shutdown -------------------------------------------------------------------------------------
def _threads(directory, tag):
    return {p.name: json.loads(p.read_text()) for p in directory.glob(f"{tag}-*.json")}


def test_clean_shutdown_after_training_and_before_the_first_step(tmp_path):
    result = train.launch(L.shutdown, workers=3, config={"dir": str(tmp_path), "how": "normal"})
    assert result.value == "done"
    for tag in ("ma-closed", "easgd-closed", "ma-served", "easgd-served", "exit"):
        found = _threads(tmp_path, tag)
        assert found and all(names == [] for names in found.values()), (tag, found)
    assert len(_threads(tmp_path, "exit")) == 3


def test_clean_shutdown_when_a_trainer_raises(tmp_path):
    with pytest.raises(train.WorkerGroupError, match="rank 1 of 3: (.|\\n)*trainer failure"):
        train.launch(L.shutdown, workers=3, config={"dir": str(tmp_path), "how": "raise"})
    assert _threads(tmp_path, "exit") == {"exit-1.json": []}  # its shadow thread was stopped and joined


@pytest.mark.slow
def test_clean_shutdown_when_a_trainer_is_killed(tmp_path):
    with pytest.raises(train.WorkerGroupError, match="rank 1 of 3: (.|\\n)*SIGKILL"):
        train.launch(L.shutdown, workers=3, config={"dir": str(tmp_path), "how": "sigkill"})
    # no process left behind: checked by the autouse fixture in tests/conftest.py


# -- configuration --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: ShadowSync(algorithm=SyncAlgorithm.NONE),
            "`algorithm` is SyncAlgorithm.NONE, but must be one of",
        ),
        (
            lambda: ShadowSync(algorithm=SyncAlgorithm.MA, duty_cycle=0),
            "`duty_cycle` is 0, but must be in (0, 1]",
        ),
        (
            lambda: ShadowSync(algorithm=SyncAlgorithm.MA, servers=-1),
            "`servers` is -1, but must be an integer >= 0",
        ),
        (
            lambda: ForegroundSync(algorithm=SyncAlgorithm.MA, period=0),
            "`period` is 0, but must be an integer >= 1",
        ),
        (
            lambda: ShadowSync(algorithm=SyncAlgorithm.EASGD, moving_rate=1.5),
            "`moving_rate` is 1.5, but must be in",
        ),
        (
            lambda: ShadowSync(algorithm=SyncAlgorithm.BMUF, block_momentum=1.0),
            "`block_momentum` is 1.0, but must",
        ),
        (
            lambda: ShadowSync(algorithm=SyncAlgorithm.BMUF, block_lr=0.0),
            "`block_lr` is 0.0, but must be > 0",
        ),
        (
            lambda: ShadowSync(algorithm=SyncAlgorithm.MA, nice=20),
            "`nice` is 20, but must be an integer in [0, 19]",
        ),
        (
            lambda: ShadowSync(algorithm=SyncAlgorithm.MA, sparse_lr=0.0),
            "`sparse_lr` is 0.0, but must be > 0",
        ),
        (
            lambda: ShadowSync(algorithm=SyncAlgorithm.EASGD, servers=1, dedicated_sync_server=True),
            "`servers` is 1, but must be >= 2 with a dedicated sync server",
        ),
    ],
)
def test_bad_configuration_is_refused(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_duty_cycle_rests_in_proportion_to_the_cost_of_a_sync():
    assert pause_after([0.02], 1.0) == 0.0  # back to back
    assert pause_after([0.02], 0.25) == pytest.approx(0.06)  # busy 25% of the time
    # rounds that waited for a resting peer do not stretch the rest (no feedback between peers)
    assert pause_after([0.3, 0.02, 0.25], 0.5) == pytest.approx(0.02)
    assert pause_after([], 0.25) == 0.0


def _paced(pacer: SlowdownPacer, sync_s: list[float], rate_during_sync: float, rounds: int) -> float:
    """Pace ``rounds`` syncs (durations cycling through ``sync_s``) against a training loop stepping
    100/s at rest; returns the fraction of steps lost over the last half."""
    recent: list[float] = []
    lost = total = 0.0
    for i in range(rounds):
        synced = sync_s[i % len(sync_s)]
        recent = [*recent, synced][-16:]
        rest = pause_after(recent, pacer.duty_cycle())
        pacer.record(
            synced_s=synced, sync_steps=rate_during_sync * synced, rested_s=rest, rest_steps=100 * rest
        )
        if i >= rounds // 2:
            lost += (100 - rate_during_sync) * synced
            total += 100 * (synced + rest)
    return lost / total


def test_slowdown_pacer_keeps_training_within_its_budget():
    pacer = SlowdownPacer(max_slowdown=0.05)
    assert pacer.loss() is None and pacer.duty_cycle() == pytest.approx(0.15)  # starts at 3x the budget
    assert _paced(pacer, [0.01], 0.0, 2000) == pytest.approx(0.05, rel=0.05)  # a sync stalls training
    assert pacer.duty_cycle() == pytest.approx(0.05, rel=0.05)
    # syncs that last longer than the shortest recent one (pause_after's measure of their cost):
    # the busy fraction exceeds the nominal duty cycle, and the measured loss corrects for it
    pacer = SlowdownPacer(max_slowdown=0.05)
    assert _paced(pacer, [0.01, 0.03], 50.0, 4000) == pytest.approx(0.05, rel=0.1)
    assert pacer.duty_cycle() < 0.09
    free = SlowdownPacer(max_slowdown=0.05)  # syncing costs nothing: nearly back to back
    _paced(free, [0.01], 100.0, 500)
    assert free.duty_cycle() == pytest.approx(0.9)
    # a step landing in a short window counts in proportion to the window (rates, not rounding)
    fractional = SlowdownPacer(max_slowdown=0.1, memory_s=math.inf)
    for i in range(1000):  # 1 step per 10 ms throughout; windows of 3 ms (sync) and 7 ms (rest)
        landed = i % 10 < 3  # the step falls in the sync window 3 times in 10
        fractional.record(
            synced_s=0.003, sync_steps=float(landed), rested_s=0.007, rest_steps=float(not landed)
        )
    assert fractional.slowdown() == pytest.approx(0.0, abs=1e-9)
    assert fractional.loss() == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match=re.escape("`max_slowdown` is 1.0, but must be in (0, 1)")):
        ShadowSync(algorithm=SyncAlgorithm.MA, max_slowdown=1.0)


def test_options_are_enums():
    with pytest.raises(TypeError, match="SyncAlgorithm"):
        ShadowSync(algorithm="ma")
    with pytest.raises(TypeError, match="Apply"):
        ShadowSync(algorithm=SyncAlgorithm.MA, apply="delta")


def test_sparse_modules_must_exist():
    model = DLRM(vocab_sizes=[10], dense_features=2, embedding_dim=2)
    strategy = ShadowSync(algorithm=SyncAlgorithm.MA, sparse_modules=["tables"])
    with pytest.raises(ValueError, match=r"names \['tables'\]"):
        train.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), strategy=strategy)


def test_pbt_copies_shadowsync_trials_with_their_strategy_state(tmp_path):
    lrs = [0.001, 0.003, 0.01, 0.03]
    results = dtune.run(
        L.pbt_trial,
        param_space={"lr": dtune.grid(lrs), "epochs": 6},
        metric="loss", mode="min", storage=str(tmp_path / "exp"), seed=0, verbose=0,
        resources=dtune.Resources(workers=2, cpus=0.5),  # two trials at a time, so there are donors
        scheduler=dtune.schedulers.PBT(2, {"lr": lrs}, quantile_fraction=0.5, seed=0),
    )  # fmt: skip
    assert all(t.status is TrialStatus.TERMINATED for t in results)
    assert sum(t.metrics_history[-1]["syncs"] for t in results) > 0  # the shadow threads synced
    copies = [entry for t in results for entry in t.lineage]
    # a copy of a donor before its last epoch trains on and reports from donor_iteration + 1
    assert any(entry["donor_iteration"] < 6 for entry in copies), f"no copy trained on: {copies}"
    for trial in results:  # a copy counts on from its donor's steps: the strategy's state came along
        for report in trial.metrics_history:
            assert report["strategy_steps"] == report["training_iteration"] * L.PBT_STEPS_PER_EPOCH
