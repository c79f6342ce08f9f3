"""Codistillation: gloo worker groups for the distributed behaviour, one process for the rest."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dtune import train
from dtune.train._codistillation import Codistillation, DistillLoss
from dtune.train._schedules import CodistillationRecipe, shift_milestones
from tests.train import _codistill_loops as C
from tests.train import _loops as L

STEPS = 11
RUNS = [
    {"period": 3, "delay": 1, "burn_in": 0},
    {"period": 4, "delay": 3, "burn_in": 2, "skip": (5, 7), "discard": (9,)},
]
CONFIG = {
    "independent": {"steps": 6},
    "exchanges": {"steps": STEPS, "runs": RUNS},
    "gradient": {},
    "resume": {"steps": (5, 6)},
    "one_model": {"steps": 4},
}


@pytest.fixture(scope="module")
def two_workers():
    """Every two-worker scenario, run once in one group of two gloo processes."""
    return train.launch(C.scenarios, workers=2, config={**CONFIG, "run": list(CONFIG)}).value


def _train_alone(seed: int, part: int, steps: int) -> dict[str, torch.Tensor]:
    """Reference: one model trained in this process on worker ``part``'s half of every batch."""
    model = L.make_model(seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        x, y = L.global_batch(step)
        x, y = x.chunk(2)[part], y.chunk(2)[part]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.state_dict()


def test_alpha_zero_equals_independent_training(two_workers):
    result = two_workers["independent"]
    for index, got in enumerate(result["models"]):
        want = _train_alone(seed=index, part=index, steps=6)
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(result["models"][0]["0.weight"], result["models"][1]["0.weight"])
    assert result["metrics"]["codistill_extra_forward_passes"] == 0  # alpha = 0: no replica forward


def _expected_snapshot(step: int, period: int, delay: int, burn_in: int) -> int:
    """The peer step whose weights the replica must hold when step ``step`` (0-based) distils."""
    launches = [k for k in range(burn_in, step + 1, period)]
    visible = [k for k in launches if k == burn_in or k + delay - 1 <= step]
    return max(visible)


def test_replica_equals_peer_weights_from_the_last_visible_exchange(two_workers):
    steps, results = STEPS, two_workers["exchanges"]
    for run, result in zip(RUNS, results, strict=True):
        period, delay, burn_in = run["period"], run["delay"], run["burn_in"]
        assert set(result["seen"]) == {s for s in range(burn_in, steps) if s not in run.get("skip", ())}
        for step, replica in result["seen"].items():
            source = _expected_snapshot(step, period, delay, burn_in)
            torch.testing.assert_close(replica, result["peer"][source], atol=0, rtol=0)
            if source > 0:  # and it is not some other step's weights
                assert not torch.equal(replica, result["peer"][source - 1])
        metrics = result["metrics"]
        exchanges = 1 + (steps - burn_in) // period
        assert metrics["codistill_exchanges"] == exchanges
        assert metrics["codistill_bytes_sent"] == exchanges * result["payload"]
        assert metrics["codistill_bytes_received"] == exchanges * result["payload"]  # n - 1 = 1 peer
        assert metrics["codistill_extra_forward_passes"] == len(result["seen"])
        assert metrics["codistill_extra_forward_samples"] == 16 * len(result["seen"])
        assert metrics["codistill_allreduce_bytes"] == 0  # one worker per model: nothing to reduce
        assert result["modes"] == [False]  # replicas run in eval mode
        mistakes = len(run.get("skip", ())) + len(run.get("discard", ()))
        assert metrics["codistill_steps_without_distillation"] == mistakes
        kinds = [kind for key, kind in (("skip", "ran without"), ("discard", "other than")) if key in run]
        assert len(result["warnings"]) == len(kinds)  # once per kind of mistake
        for kind, message in zip(kinds, result["warnings"], strict=True):
            assert kind in message and "strategy.loss" in message


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_distillation_gradient_matches_a_hand_computation(two_workers):
    alpha = 0.7
    for r in two_workers["gradient"]:
        torch.manual_seed(1)  # the peer: model 1's initial weights, exchanged at prepare
        peer = nn.Linear(4, 3)
        torch.testing.assert_close(r["peer_weight"], peer.weight.detach(), atol=0, rtol=0)
        x, y = r["x"].double().numpy(), r["y"].numpy()
        z = x @ r["weight"].double().numpy().T + r["bias"].double().numpy()
        zp = x @ r["peer_weight"].double().numpy().T + r["peer_bias"].double().numpy()
        batch, classes = z.shape
        p, q, onehot = _softmax(z), _softmax(zp), np.eye(classes)[y]
        task = -np.log(p[np.arange(batch), y]).mean()
        if r["kind"] == "kl":
            distill = (q * (np.log(q) - np.log(p))).sum() / batch
            dz_distill = (p - q) / batch
        else:
            distill = ((z - zp) ** 2).mean()
            dz_distill = 2 * (z - zp) / (batch * classes)
        dz = (p - onehot) / batch + alpha * dz_distill
        np.testing.assert_allclose(r["distillation"], distill, rtol=1e-5)
        np.testing.assert_allclose(r["loss"], task + alpha * distill, rtol=1e-5)
        np.testing.assert_allclose(r["grad_weight"].numpy(), dz.T @ x, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(r["grad_bias"].numpy(), dz.sum(axis=0), rtol=1e-4, atol=1e-6)


def test_state_round_trip_restores_every_model_replicas_and_the_gather_in_flight(two_workers):
    result = two_workers["resume"]
    saved, straight, resumed = result["saved"], result["straight"], result["resumed"]
    assert saved["steps"] == 5 and saved["replicas"]["pending"]["step"] == 4  # launched after 4, due at 6
    assert straight["steps"] == resumed["steps"] == 11
    for index in range(2):
        for key, value in straight["per_model"][index]["model"].items():
            torch.testing.assert_close(resumed["per_model"][index]["model"][key], value, atol=0, rtol=0)
        assert straight["per_model"][index]["optimizer"]["state"]  # momentum is part of the state
    assert torch.equal(resumed["replicas"]["front"], straight["replicas"]["front"])
    assert straight["replicas"]["snapshot_step"] == resumed["replicas"]["snapshot_step"] == 8
    assert resumed["replicas"]["counters"] == straight["replicas"]["counters"]
    for key, value in straight["counters"].items():
        if key != "extra_forward_s":
            assert resumed["counters"][key] == value, key


def test_one_model_reduces_to_plain_allreduce(two_workers):
    result = two_workers["one_model"]
    for got, want in zip(result["codistillation"], result["allreduce"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    parameter_bytes = sum(p.numel() * 4 for p in L.make_model().parameters())
    assert result["metrics"]["codistill_allreduce_bytes"] == 4 * parameter_bytes
    assert result["metrics"]["codistill_exchanges"] == result["metrics"]["codistill_bytes_sent"] == 0


@pytest.mark.slow  # four processes on two cores: tens of seconds
def test_two_models_of_two_workers_each():
    ranks = train.launch(C.two_by_two, workers=4, config={"steps": 3}).value["ranks"]
    assert [r["model_index"] for r in ranks] == [0, 0, 1, 1]
    for a, b in ((0, 1), (2, 3)):  # all-reduce inside each model group keeps its workers identical
        for wa, wb in zip(ranks[a]["history"], ranks[b]["history"], strict=True):
            torch.testing.assert_close(wa, wb, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(ranks[0]["history"][-1], ranks[2]["history"][-1])
    for me, peer in ((0, 2), (1, 3), (2, 0), (3, 1)):  # exchanged at 0 and after step 2 (visible at 3)
        assert ranks[me]["snapshot_step"] == 2
        torch.testing.assert_close(ranks[me]["replica"], ranks[peer]["history"][2], atol=1e-6, rtol=1e-6)
    metrics = ranks[0]["metrics"]
    assert metrics["codistill_allreduce_bytes"] == 3 * sum(p.numel() * 4 for p in L.make_model().parameters())
    assert metrics["codistill_exchanges"] == 2


# ---- one process --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": -1.0}, "`alpha` is -1.0, but must be >= 0"),
        ({"period": 0}, "`period` is 0, but must be an integer >= 1"),
        ({"burn_in_steps": -2}, "`burn_in_steps` is -2"),
        ({"models": 0}, "`models` is 0"),
        ({"period": 2, "delay_steps": 3}, "`delay_steps` is 3, but must be <= `period` 2"),
        ({"bucket_mb": 0}, "`bucket_mb` is 0"),
    ],
)
def test_bad_configuration_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Codistillation(**kwargs)


def test_options_are_enums_and_topology_is_checked():
    with pytest.raises(TypeError, match="DistillLoss"):
        Codistillation(distill_loss="kl")
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="`models` is 2, but must divide the 1 workers"):
        train.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), strategy=Codistillation(models=2))
    with pytest.raises(RuntimeError, match="train.prepare"):
        Codistillation().loss(torch.tensor(0.0), torch.zeros(1, 2), torch.zeros(1, 2))


def test_loss_refuses_detached_outputs_and_non_scalar_task_losses():
    model = nn.Linear(2, 2)
    strategy = Codistillation(models=1)
    model, _ = train.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), strategy=strategy)
    x = torch.zeros(3, 2)
    outputs = model(x)
    with pytest.raises(ValueError, match="detached"):
        strategy.loss(outputs.sum(), outputs.detach(), x)
    with pytest.raises(ValueError, match="scalar"):
        strategy.loss(outputs, outputs, x)


def test_state_round_trip_in_one_process_restores_weights_and_counters():
    def build(seed):
        torch.manual_seed(seed)
        model = nn.Linear(3, 2)
        strategy = Codistillation(models=1, period=2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return (*train.prepare(model, optimizer, strategy=strategy), strategy)

    model, optimizer, strategy = build(0)
    x = torch.randn(4, 3)
    for _ in range(3):
        outputs = model(x)
        optimizer.zero_grad()
        strategy.loss(outputs.pow(2).mean(), outputs, x).backward()
        optimizer.step()
    state = strategy.state_dict()
    other_model, _, other = build(1)
    other.load_state_dict(state)
    assert other.steps == 3 and other.counters["distill_calls"] == 3
    torch.testing.assert_close(other_model.weight, model.weight, atol=0, rtol=0)
    assert other.state_dict()["per_model"][0]["optimizer"]["state"]
    bad = dict(state, models=2)
    with pytest.raises(ValueError, match="2 models on 1 workers"):
        other.load_state_dict(bad)


def test_distill_losses_match_their_formulas():
    own, peer = torch.randn(6, 4), torch.randn(6, 4)
    p, q = own.softmax(-1), peer.softmax(-1)
    torch.testing.assert_close(DistillLoss.KL(own, peer), (q * (q.log() - p.log())).sum() / 6)
    torch.testing.assert_close(DistillLoss.MSE(own, peer), ((own - peer) ** 2).mean())
    assert DistillLoss.KL(own, own).item() == pytest.approx(0.0, abs=1e-6)


def test_recipe_lowers_weight_decay_at_the_shifted_milestones():
    recipe = CodistillationRecipe(lr=0.2, milestones=(15, 30, 40), milestone_shift=(3, 8, 4), warmup_steps=4)
    assert recipe.shifted_milestones == (18, 38, 44)
    assert [recipe.weight_decay_at(s) for s in (0, 17, 18, 37, 38, 100)] == [1e-4, 1e-4, 1e-5, 1e-5, 0.0, 0.0]
    assert recipe.lr_at(0) == pytest.approx(0.05)  # warm-up: 1/4 of the base rate
    assert [round(recipe.lr_at(s), 8) for s in (10, 18, 38, 44)] == [0.2, 0.02, 0.002, 0.0002]
    baseline = CodistillationRecipe(lr=0.2, milestones=(15, 30, 40), weight_decay=1e-4)
    assert baseline.shifted_milestones == (15, 30, 40) and baseline.weight_decay_at(1000) == 1e-4
    custom = CodistillationRecipe(lr=lambda s: 1.0 / (s + 1), weight_decay=lambda s: 0.01 * s)
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.5)
    custom.apply(optimizer, step=3)
    assert optimizer.param_groups[0]["lr"] == 0.25 and optimizer.param_groups[0]["weight_decay"] == 0.03


def test_milestone_shift_and_recipe_validation():
    assert shift_milestones((100, 200), 0.2) == (120, 240)
    assert shift_milestones((90, 95), 0.1, total_steps=100) == (99, 100)  # capped, kept distinct
    assert shift_milestones((10, 11), 0.0) == (10, 11)
    with pytest.raises(ValueError, match="`shift` is"):
        shift_milestones((10, 20), (1,))
    with pytest.raises(ValueError, match="strictly increasing"):
        CodistillationRecipe(milestones=(20, 10))
    with pytest.raises(ValueError, match="`weight_decay` is"):
        CodistillationRecipe(weight_decay=(1e-4, -1.0))
    with pytest.raises(ValueError, match="`lr_decay` is 0"):
        CodistillationRecipe(lr_decay=0)
