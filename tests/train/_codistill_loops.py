"""Training loops run by worker processes in the codistillation tests."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from dtune import train
from dtune.runtime import distributed
from dtune.train._codistillation import Codistillation, DistillLoss
from tests.train import _loops as L


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat(
        [t.detach().reshape(-1).float().clone() for t in [*module.parameters(), *module.buffers()]]
    )


def _step(model: Any, optimizer: Any, strategy: Codistillation, step: int, distill: str = "yes") -> None:
    x, y = L.local_part(step)
    outputs = model(x)
    loss = nn.functional.cross_entropy(outputs, y)
    if distill == "yes":
        loss = strategy.loss(loss, outputs, x)
    elif distill == "discard":  # a mistake: the returned loss is dropped
        strategy.loss(loss, outputs, x)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def independent(config: dict[str, Any]) -> dict[str, Any]:
    """Two models with alpha = 0; returns both models' final weights (from the collective state)."""
    strategy = Codistillation(alpha=0.0, period=2, models=2)
    model = L.make_model(seed=strategy.model_index)
    model, optimizer = train.prepare(
        model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), strategy=strategy
    )
    for step in range(config["steps"]):
        _step(model, optimizer, strategy, step)
    state = strategy.state_dict()
    return {"models": [entry["model"] for entry in state["per_model"]], "metrics": strategy.metrics()}


def exchanges(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Per run: the replica rank 0 distils from at every step, and the peer's weights over time."""
    out = []
    for run in config["runs"]:
        strategy = Codistillation(
            alpha=0.5, period=run["period"], delay_steps=run["delay"], burn_in_steps=run["burn_in"], models=2
        )
        model = L.make_model(seed=strategy.model_index, batchnorm=True)  # buffers travel too
        model, optimizer = train.prepare(
            model, torch.optim.SGD(model.parameters(), lr=0.1), strategy=strategy
        )
        own = {0: flat(model)}
        seen: dict[int, torch.Tensor] = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(config["steps"]):
                distill = "no" if step in run.get("skip", ()) else "yes"
                distill = "discard" if step in run.get("discard", ()) else distill
                _step(model, optimizer, strategy, step, distill)
                if distill != "no" and step >= run["burn_in"]:
                    seen[step] = flat(strategy.replicas[0])
                own[step + 1] = flat(model)
        histories = distributed.all_gather_object(own)
        payload = sum(-(-t.numel() * t.element_size() // 16) * 16 for t in model.state_dict().values())
        out.append(
            {
                "seen": seen,
                "peer": histories[1],
                "metrics": strategy.metrics(),
                "payload": payload,
                "warnings": [str(w.message) for w in caught if issubclass(w.category, UserWarning)],
                "modes": [r.training for r in strategy.replicas],
            }
        )
        strategy.close()
    return out


def gradient(config: dict[str, Any]) -> list[dict[str, Any]]:
    """One step of a tiny linear model per distillation loss; rank 0 returns what a hand check needs."""
    out = []
    for kind in (DistillLoss.KL, DistillLoss.MSE):
        strategy = Codistillation(alpha=0.7, period=1, models=2, distill_loss=kind)
        torch.manual_seed(strategy.model_index)
        model = nn.Linear(4, 3)
        model, _ = train.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), strategy=strategy)
        generator = torch.Generator().manual_seed(50 + strategy.model_index)
        x, y = torch.randn(5, 4, generator=generator), torch.randint(0, 3, (5,), generator=generator)
        outputs = model(x)
        loss = strategy.loss(nn.functional.cross_entropy(outputs, y), outputs, x)
        loss.backward()
        replica = strategy.replicas[0]
        out.append(
            {
                "kind": kind.value,
                "x": x, "y": y, "loss": loss.item(),
                "weight": model.weight.detach().clone(), "bias": model.bias.detach().clone(),
                "peer_weight": replica.weight.clone(), "peer_bias": replica.bias.clone(),
                "grad_weight": model.weight.grad.clone(), "grad_bias": model.bias.grad.clone(),
                "distillation": strategy.metrics()["codistill_distillation"],
            }
        )  # fmt: skip
        strategy.close()
    return out


def _build(seed: int) -> tuple[Any, Any, Codistillation]:
    strategy = Codistillation(alpha=lambda step: 0.2 + 0.1 * step, period=4, delay_steps=3, models=2)
    model = L.make_model(seed=seed + strategy.model_index, batchnorm=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = train.prepare(model, optimizer, strategy=strategy)
    return model, optimizer, strategy


def resume(config: dict[str, Any]) -> dict[str, Any]:
    """Save mid-run (with a gather in flight), go on; restore rank 0's state into fresh objects, go on."""
    first, second = config["steps"]
    model, optimizer, strategy = _build(seed=0)
    for step in range(first):
        _step(model, optimizer, strategy, step)
    saved = [strategy.state_dict()]  # collective
    torch.distributed.broadcast_object_list(saved, src=0)  # every rank restores from rank 0's copy
    for step in range(first, first + second):
        _step(model, optimizer, strategy, step)
    straight = strategy.state_dict()
    model, optimizer, strategy = _build(seed=100)  # a different start: the state must overwrite it
    strategy.load_state_dict(saved[0])
    for step in range(first, first + second):
        _step(model, optimizer, strategy, step)
    resumed = strategy.state_dict()
    return {"saved": saved[0], "straight": straight, "resumed": resumed}


def one_model(config: dict[str, Any]) -> dict[str, Any]:
    """The same run under AllReduce and under Codistillation(models=1); rank 0's weights of each."""
    out: dict[str, Any] = {}
    for name in ("allreduce", "codistillation"):
        model = L.make_model()
        strategy = train.AllReduce() if name == "allreduce" else Codistillation(models=1, period=1)
        model, optimizer = train.prepare(
            model, torch.optim.SGD(model.parameters(), lr=0.1), strategy=strategy
        )
        for step in range(config["steps"]):
            x, y = L.local_part(step)
            outputs = model(x)
            loss = nn.functional.cross_entropy(outputs, y)
            if isinstance(strategy, Codistillation):
                assert strategy.loss(loss, outputs, x) is loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        out[name] = [p.detach().clone() for p in train.unwrap(model).parameters()]
        if isinstance(strategy, Codistillation):
            out["metrics"] = strategy.metrics()
    return out


def two_by_two(config: dict[str, Any]) -> dict[str, Any]:
    """4 workers, 2 models of 2 workers each; every rank's weights history and final replica."""
    strategy = Codistillation(alpha=0.5, period=2, models=2)
    model = L.make_model(seed=distributed.rank())  # the model group must agree on rank 0 of the group
    model, optimizer = train.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), strategy=strategy)
    history = [flat(train.unwrap(model))]
    for step in range(config["steps"]):
        _step(model, optimizer, strategy, step)
        history.append(flat(train.unwrap(model)))
    mine = {
        "history": history,
        "replica": flat(strategy.replicas[0]),
        "snapshot_step": strategy.snapshot_step,
        "model_index": strategy.model_index,
        "metrics": strategy.metrics(),
    }
    return {"ranks": distributed.all_gather_object(mine)}


SCENARIOS = {"independent": independent, "exchanges": exchanges, "gradient": gradient, "resume": resume}
SCENARIOS["one_model"] = one_model


def scenarios(config: dict[str, Any]) -> dict[str, Any]:
    """Several scenarios in one worker group (a group costs seconds to start on two cores)."""
    return {name: SCENARIOS[name](config[name]) for name in config["run"]}
