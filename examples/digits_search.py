"""Search learning rate, width, weight decay and batch size of an MLP on scikit-learn's digits.

The main job of the README: a real search (32 trials by default, early-stopped by ASHA) in
which every trial is a data-parallel group of 2 worker processes (gloo, gradients all-reduced),
with a live progress table and every result and checkpoint kept in a durable experiment
directory. Interrupt it with Ctrl-C and continue with ``dtune resume DIR``.

    python examples/digits_search.py [--samples 32] [--epochs 20] [--workers 2] [--storage DIR]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import dtune


def load_digits_split(seed: int = 0) -> tuple[Any, Any, Any, Any]:
    """The 1,797 8x8 digits, standardised, split 80/20 (train/validation) with a fixed seed."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)
    return as_x(x_train), torch.tensor(y_train), as_x(x_val), torch.tensor(y_val)


def train_digits(config: dict[str, Any]) -> None:
    """One trial: train an MLP for ``config["epochs"]`` epochs, reporting accuracy every epoch.

    The same function runs on one process or on every rank of a worker group: ``train.prepare``
    averages gradients across ranks and ``train.shard`` gives each rank its share of the batches
    (``batch_size`` is per rank).
    """
    import torch
    from torch import nn

    from dtune import train

    torch.manual_seed(config.get("seed", 0))  # same seed on every rank: same initial model
    x_train, y_train, x_val, y_val = load_digits_split()
    model = nn.Sequential(nn.Linear(64, config["width"]), nn.ReLU(), nn.Linear(config["width"], 10))
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config["lr"], momentum=0.9, weight_decay=config["weight_decay"]
    )
    start = 0
    checkpoint = dtune.get_checkpoint()
    if checkpoint is not None:  # resumed after a crash, an interruption, a failure or a pause
        state = checkpoint.to_dict()
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # the config wins: PBT may have changed it
            group.update(lr=config["lr"], weight_decay=config["weight_decay"])
        start = state["epoch"]
    model, optimizer = train.prepare(model, optimizer, strategy=train.AllReduce())
    ctx = train.context()
    for epoch in range(start, config["epochs"]):
        model.train()
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(epoch))
        batches = order.split(config["batch_size"])
        for batch in train.shard(batches):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            logits = model(x_val)
            val_loss = nn.functional.cross_entropy(logits, y_val).item()
            acc = (logits.argmax(1) == y_val).float().mean().item()
        checkpoint = None
        if ctx.is_main:  # only rank 0's checkpoint is kept
            state = {
                "model": train.unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch + 1,
            }
            checkpoint = dtune.Checkpoint.from_dict(state)
        dtune.report({"acc": acc, "val_loss": val_loss}, checkpoint=checkpoint)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32, help="number of trials (default 32)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per trial (default 20)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes per trial (default 2)")
    parser.add_argument("--storage", default=f"runs/digits-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    results = dtune.run(
        train_digits,
        param_space={
            "lr": dtune.loguniform(1e-3, 0.5),
            "width": dtune.choice([16, 32, 64, 128]),
            "weight_decay": dtune.loguniform(1e-6, 1e-2),
            "batch_size": dtune.choice([16, 32, 64]),
            "epochs": args.epochs,
        },
        metric="acc",
        mode="max",
        num_samples=args.samples,
        resources=dtune.Resources(cpus=1, workers=args.workers),
        scheduler=dtune.schedulers.ASHA(max_t=args.epochs, grace_period=2, reduction_factor=3),
        storage=args.storage,
        seed=args.seed,
        keep_checkpoints_num=1,
    )
    best = results.best
    print(
        f"\nBest trial {best.trial_id}: acc={best.metrics['acc']:.4f} "
        f"after {best.metrics['training_iteration']} epochs"
    )
    print(
        "Best config: "
        + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.config.items())
    )
    print(f"Results written to {results.experiment_path} (see `dtune status {results.experiment_path}`)")


if __name__ == "__main__":
    main()
